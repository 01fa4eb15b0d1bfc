"""Tiny configurations shared by the tests."""

import dataclasses

from metarl.config import (
    AgentConfig,
    EnvConfig,
    LoggerConfig,
    MetaConfig,
    OptimizerConfig,
    TrainConfig,
)


def tiny_config(
    env: str = "catch",
    optimizer: str = "adam",
    inner_steps: int = 2,
    grad: str = "mixflow",
    dtype: str = "float64",
    **meta_overrides,
) -> TrainConfig:
    """A real configuration small enough to compile and run in seconds."""
    meta = dataclasses.replace(
        MetaConfig(
            steps=3,
            inner_steps=inner_steps,
            population_size=2,
            lifetime=64,
            grad=grad,
        ),
        **meta_overrides,
    )
    return TrainConfig(
        env=EnvConfig(name=env),
        agent=AgentConfig(
            num_envs=2,
            unroll_length=4,
            hidden_sizes=(8,),
            optimizer=OptimizerConfig(name=optimizer, learning_rate=0.05),
        ),
        meta=meta,
        logger=LoggerConfig(mode="disabled", log_every=1),
        dtype=dtype,
    )
