"""Rollouts of `T` steps in `B` environments with `lax.scan`."""

from typing import NamedTuple

import chex
import distrax
import jax
import jax.numpy as jnp

from envs import EnvCarry, VecEnv


class Trajectory(NamedTuple):
    """`T` steps of `B` environments, time-major.

    `next_values` are the behaviour network's values of the state each action
    led to (the final observation where an episode ended), so a truncated
    episode bootstraps from where it stopped rather than from the reset state.
    """

    obs: chex.Array  # [T, B, *obs_shape]
    actions: chex.Array  # [T, B]
    rewards: chex.Array  # [T, B]
    terminated: chex.Array  # [T, B] bool
    truncated: chex.Array  # [T, B] bool
    values: chex.Array  # [T, B] behaviour values of `obs`
    next_values: chex.Array  # [T, B] behaviour values of the next states
    # Only for networks with a prediction head (learned-target objectives):
    log_probs: chex.Array | None = None  # [T, B] behaviour log-prob of actions
    predictions: chex.Array | None = None  # [T, B, M] behaviour predictions
    next_predictions: chex.Array | None = None  # [T, B, M] of the next states


class RolloutStats(NamedTuple):
    """Episode tallies of one rollout, over finished episodes only."""

    return_sum: chex.Array  # [] summed return of episodes that ended
    length_sum: chex.Array  # [] summed length of episodes that ended
    episodes: chex.Array  # [] number of episodes that ended


def _step_keys(key: chex.PRNGKey, unroll_length: int):
    """Per-step keys for actions and environment steps, `[T]` each.

    `rollout` and `replay` both derive them here, so a replay steps the
    environments with exactly the randomness the rollout used.
    """
    keys = jax.vmap(jax.random.split)(jax.random.split(key, unroll_length))
    return keys[:, 0], keys[:, 1]


def rollout(
    network,
    params,
    env: VecEnv,
    env_carry: EnvCarry,
    key: chex.PRNGKey,
    unroll_length: int,
) -> tuple[Trajectory, EnvCarry, RolloutStats]:
    """Acts for `unroll_length` steps with the policy of `params`.

    The returned trajectory is a constant for differentiation: gradients of
    losses built on it flow only through the networks applied in the loss.
    A network with a prediction head also records the log-probabilities of
    the actions and the predictions at `t` and `t+1`.

    Args:
      network: a `Network` with `apply(params, obs) -> (logits, value)`.
      params: the network parameters that act.
      env: the batch of environments.
      env_carry: the environments' state before the first step.
      key: randomness for actions and environment steps.
      unroll_length: `T`, the number of steps.

    Returns:
      `(trajectory, env_carry_after, stats)`.
    """
    with_predictions = bool(getattr(network, "prediction_size", 0))

    def evaluate(obs):
        if with_predictions:
            return network.apply_predictions(params, obs)
        logits, value = network.apply(params, obs)
        return logits, value, None

    def step(env_carry, keys):
        action_key, env_key = keys

        # Act with the current policy.
        logits, value, prediction = evaluate(env_carry.obs)
        policy = distrax.Categorical(logits=logits)
        # gymnax environments expect int32 actions, also in 64-bit mode.
        action = policy.sample(seed=action_key).astype(jnp.int32)

        # Step the environments.
        new_carry, out = env.step(env_carry, action, env_key)
        transition = {
            "obs": env_carry.obs,
            "actions": action,
            "rewards": out.reward,
            "terminated": out.terminated,
            "truncated": out.truncated,
            "values": value,
            "next_obs": out.next_obs,
        }
        if with_predictions:
            transition["log_probs"] = policy.log_prob(action)
            transition["predictions"] = prediction
        done = jnp.logical_or(out.terminated, out.truncated)
        stats = RolloutStats(
            return_sum=out.finished_return.sum(),
            length_sum=out.finished_length.sum(),
            episodes=done.sum(),
        )
        return new_carry, (transition, stats)

    env_carry, (steps, stats) = jax.lax.scan(
        step, env_carry, _step_keys(key, unroll_length)
    )

    # Value the states the actions led to in one batch after the loop: the
    # states do not depend on these values, and one large batch runs faster
    # than one small batch per step.
    _, next_values, next_predictions = evaluate(steps.pop("next_obs"))
    if with_predictions:
        steps["next_predictions"] = next_predictions
    trajectory = jax.lax.stop_gradient(Trajectory(next_values=next_values, **steps))
    stats = jax.tree.map(jnp.sum, stats)
    return trajectory, env_carry, stats


def record(trajectory: Trajectory) -> Trajectory:
    """What `replay` needs of a rollout's trajectory: what the network produced.

    The actions, values and (with a prediction head) log-probabilities and
    predictions, a few numbers per step; the observations, rewards and ends
    of episodes are left out (`None`), since stepping the environments again
    gives them back.
    """
    return trajectory._replace(obs=None, rewards=None, terminated=None, truncated=None)


def replay(
    env: VecEnv, env_carry: EnvCarry, key: chex.PRNGKey, record: Trajectory
) -> Trajectory:
    """Rebuilds a rollout's trajectory from its `record`, without the network.

    Stepping the environments again from `env_carry` with the recorded actions
    and the rollout's own keys reproduces the observations, rewards and ends
    of episodes exactly, so a backward pass can keep the record instead of the
    trajectory and skip the network's forward passes.

    Args:
      env: the batch of environments the rollout stepped.
      env_carry: the environments' state before the rollout.
      key: the rollout's key.
      record: `record(trajectory)` of the rollout's trajectory, `[T, B]`.

    Returns:
      The rollout's trajectory.
    """
    unroll_length = record.actions.shape[0]
    _, env_keys = _step_keys(key, unroll_length)

    def step(env_carry, inputs):
        action, env_key = inputs
        new_carry, out = env.step(env_carry, action, env_key)
        return new_carry, (env_carry.obs, out.reward, out.terminated, out.truncated)

    _, (obs, rewards, terminated, truncated) = jax.lax.scan(
        step, env_carry, (record.actions, env_keys)
    )
    trajectory = record._replace(
        obs=obs, rewards=rewards, terminated=terminated, truncated=truncated
    )
    return jax.lax.stop_gradient(trajectory)
