"""Short environment names and the gymnax environments they stand for."""

from envs.vec import VecEnv

ENV_IDS = {
    "breakout": "Breakout-MinAtar",
    "asterix": "Asterix-MinAtar",
    "freeway": "Freeway-MinAtar",
    "space_invaders": "SpaceInvaders-MinAtar",
    "seaquest": "Seaquest-MinAtar",
    "cartpole": "CartPole-v1",
    "acrobot": "Acrobot-v1",
    "catch": "Catch-bsuite",
}


class UnknownEnvError(ValueError):
    """Raised for an environment name that metarl does not know."""


def make(name: str, num_envs: int, max_episode_steps: int | None = None) -> VecEnv:
    """Builds `num_envs` copies of the environment called `name`.

    Args:
      name: a short name, one of `ENV_IDS`.
      num_envs: how many environments step in lockstep.
      max_episode_steps: overrides the environment's own time limit; episodes
        that reach it are truncated, not terminated.

    Returns:
      A `VecEnv` over the gymnax environment.

    Raises:
      UnknownEnvError: if `name` is not in `ENV_IDS`.
      ValueError: if `num_envs` or `max_episode_steps` is not positive.
    """
    if name not in ENV_IDS:
        raise UnknownEnvError(
            f"unknown env '{name}'; choose one of: {', '.join(sorted(ENV_IDS))}"
        )
    if num_envs < 1:
        raise ValueError(f"num_envs must be positive, got {num_envs}")
    # Importing gymnax creates arrays, which starts JAX's backend; deferring it
    # to here leaves a multi-process run free to connect its processes first.
    import gymnax

    env, env_params = gymnax.make(ENV_IDS[name])
    if max_episode_steps is not None:
        if max_episode_steps < 1:
            raise ValueError(
                f"max_episode_steps must be positive, got {max_episode_steps}"
            )
        env_params = env_params.replace(max_steps_in_episode=max_episode_steps)
    return VecEnv(name=name, env=env, env_params=env_params, num_envs=num_envs)
