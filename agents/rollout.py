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

    def step(carry, step_key):
        env_carry = carry
        action_key, env_key = jax.random.split(step_key)

        # Act with the current policy.
        logits, value, prediction = evaluate(env_carry.obs)
        policy = distrax.Categorical(logits=logits)
        # gymnax environments expect int32 actions, also in 64-bit mode.
        action = policy.sample(seed=action_key).astype(jnp.int32)

        # Step the environments and value the states the actions led to.
        new_carry, out = env.step(env_carry, action, env_key)
        _, next_value, next_prediction = evaluate(out.next_obs)
        extras = {}
        if with_predictions:
            extras = {
                "log_probs": policy.log_prob(action),
                "predictions": prediction,
                "next_predictions": next_prediction,
            }
        transition = Trajectory(
            obs=env_carry.obs,
            actions=action,
            rewards=out.reward,
            terminated=out.terminated,
            truncated=out.truncated,
            values=value,
            next_values=next_value,
            **extras,
        )
        done = jnp.logical_or(out.terminated, out.truncated)
        stats = RolloutStats(
            return_sum=out.finished_return.sum(),
            length_sum=out.finished_length.sum(),
            episodes=done.sum(),
        )
        return new_carry, (transition, stats)

    keys = jax.random.split(key, unroll_length)
    env_carry, (trajectory, stats) = jax.lax.scan(step, env_carry, keys)
    trajectory = jax.lax.stop_gradient(trajectory)
    stats = jax.tree.map(jnp.sum, stats)
    return trajectory, env_carry, stats
