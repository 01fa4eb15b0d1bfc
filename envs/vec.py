"""A batch of gymnax environments that step together and keep episode tallies."""

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp


class EnvCarry(NamedTuple):
    """What a batch of `N` environments carries from one step to the next."""

    state: Any  # gymnax state, leaves [N, ...]
    obs: chex.Array  # [N, *obs_shape]
    episode_return: chex.Array  # [N] return of the running episode so far
    episode_length: chex.Array  # [N] steps of the running episode so far


class StepOutput(NamedTuple):
    """One step of `N` environments.

    `next_obs` is the observation after the action: for an episode that ended
    this step it is gymnax's `final_observation`, not the reset observation
    that the carry holds, so targets bootstrap from the right state.
    """

    reward: chex.Array  # [N]
    terminated: chex.Array  # [N] bool: the episode reached a terminal state
    truncated: chex.Array  # [N] bool: the episode hit the time limit
    next_obs: chex.Array  # [N, *obs_shape]
    finished_return: chex.Array  # [N] return of episodes that ended, else 0
    finished_length: chex.Array  # [N] length of episodes that ended, else 0


@dataclasses.dataclass(frozen=True, eq=False)
class VecEnv:
    """`num_envs` copies of one gymnax environment, auto-resetting."""

    name: str
    env: Any
    env_params: Any
    num_envs: int

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return tuple(self.env.observation_space(self.env_params).shape)

    @property
    def num_actions(self) -> int:
        return int(self.env.action_space(self.env_params).n)

    def reset(self, key: chex.PRNGKey) -> EnvCarry:
        """Starts a fresh episode in every environment."""
        keys = jax.random.split(key, self.num_envs)
        obs, state = jax.vmap(self.env.reset, in_axes=(0, None))(keys, self.env_params)
        zeros = jnp.zeros((self.num_envs,), jnp.float32)
        return EnvCarry(
            state=state,
            obs=obs.astype(jnp.float32),
            episode_return=zeros,
            episode_length=jnp.zeros((self.num_envs,), jnp.int32),
        )

    def step(
        self, carry: EnvCarry, action: chex.Array, key: chex.PRNGKey
    ) -> tuple[EnvCarry, StepOutput]:
        """Steps every environment; ended episodes restart on their own."""
        keys = jax.random.split(key, self.num_envs)
        obs, state, reward, terminated, truncated, info = jax.vmap(
            self.env.step, in_axes=(0, 0, 0, None)
        )(keys, carry.state, action, self.env_params)
        reward = reward.astype(jnp.float32)

        # Tally the running episodes, then hand back and clear the ones that ended.
        done = jnp.logical_or(terminated, truncated)
        episode_return = carry.episode_return + reward
        episode_length = carry.episode_length + 1
        output = StepOutput(
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            next_obs=info["final_observation"].astype(jnp.float32),
            finished_return=jnp.where(done, episode_return, 0.0),
            finished_length=jnp.where(done, episode_length, 0),
        )
        new_carry = EnvCarry(
            state=state,
            obs=obs.astype(jnp.float32),
            episode_return=jnp.where(done, 0.0, episode_return),
            episode_length=jnp.where(done, 0, episode_length),
        )
        return new_carry, output
