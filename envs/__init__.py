"""Vectorised, auto-resetting gymnax environments addressed by short names."""

from envs.registry import ENV_IDS, UnknownEnvError, make
from envs.vec import EnvCarry, StepOutput, VecEnv

__all__ = [
    "ENV_IDS",
    "EnvCarry",
    "StepOutput",
    "UnknownEnvError",
    "VecEnv",
    "make",
]
