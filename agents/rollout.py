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

    def step(carry, step_key):
        env_carry = carry
        action_key, env_key = jax.random.split(step_key)

        # Act with the current policy.
        logits, value = network.apply(params, env_carry.obs)
        # gymnax environments expect int32 actions, also in 64-bit mode.
        action = distrax.Categorical(logits=logits).sample(seed=action_key)
        action = action.astype(jnp.int32)

        # Step the environments and value the states the actions led to.
        new_carry, out = env.step(env_carry, action, env_key)
        _, next_value = network.apply(params, out.next_obs)
        transition = Trajectory(
            obs=env_carry.obs,
            actions=action,
            rewards=out.reward,
            terminated=out.terminated,
            truncated=out.truncated,
            values=value,
            next_values=next_value,
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
