"""Actor-critic agents: networks, rollouts, the actor-critic loss, the optimiser."""

from agents.loss import LossHyperparams, actor_critic_loss
from agents.networks import ActorCritic, make_network
from agents.optim import make_optimizer, safe_clip_by_global_norm
from agents.rollout import RolloutStats, Trajectory, record, replay, rollout

__all__ = [
    "ActorCritic",
    "LossHyperparams",
    "RolloutStats",
    "Trajectory",
    "actor_critic_loss",
    "make_network",
    "make_optimizer",
    "record",
    "replay",
    "rollout",
    "safe_clip_by_global_norm",
]
