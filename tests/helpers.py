"""Tiny configurations and file helpers shared by the tests."""

import dataclasses
import hashlib
from pathlib import Path

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


# Command-line overrides of a real training run small enough for a subprocess
# test; tests add the number of meta-steps, logging and output settings.
TINY_TRAIN_ARGS = [
    "env=catch",
    "meta.inner_steps=2",
    "meta.population_size=2",
    "meta.lifetime=8",
    "agent.num_envs=4",
    "agent.unroll_length=4",
    "agent.hidden_sizes=[16]",
]


def snapshot_files(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, with its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
