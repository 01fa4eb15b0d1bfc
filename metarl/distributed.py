"""Several processes running one meta-step: connecting them, and who writes.

`jax.distributed.initialize` connects the processes before JAX touches a
device; after it, `jax.devices()` lists the devices of every process and the
mesh of `metarl.sharding` spans all hosts. Every process runs the same
compiled meta-step on its own devices, but only process 0 prints progress,
logs metrics and writes files, so a run leaves one set of outputs however
many hosts it used.
"""

import contextlib
import os
from collections.abc import Iterator

import jax

from metarl.cli import config_dir
from metarl.config import ConfigError, DistributedConfig, from_dict

# Hydra settings for a process other than 0: no run folder of its own, no copy
# of the config and no log file.
QUIET_HYDRA_OVERRIDES = (
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
)


def initialize(config: DistributedConfig) -> None:
    """Connects this process to the others of the run, if `config.enabled`.

    Settings left as None are detected by JAX from the cluster environment.
    Calling it again once connected does nothing.

    Args:
      config: the `distributed` settings.

    Raises:
      ConfigError: if JAX cannot start its distributed runtime, for instance
        when no coordinator is given and no cluster is detected, or when JAX
        has already run a computation in this process.
    """
    if not config.enabled or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    except (RuntimeError, ValueError) as error:
        lines = str(error).strip().splitlines()
        reason = lines[0] if lines else type(error).__name__
        raise ConfigError(
            f"jax.distributed.initialize failed ({reason}); set "
            "distributed.coordinator_address, distributed.num_processes and "
            "distributed.process_id, or launch under a cluster manager that JAX "
            "detects (SLURM, Open MPI, ...)"
        ) from error


def is_main_process() -> bool:
    """Whether this is process 0, the one that logs and writes files."""
    return jax.process_index() == 0


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Silences standard output on every process but process 0.

    Every process would otherwise print the same progress lines. Standard
    error stays open, so any process's errors and warnings are still seen.
    """
    if is_main_process():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def start_from_argv(argv: list[str]) -> list[str]:
    """Connects the processes before Hydra starts, if the command line asks to.

    Hydra creates the run folder, its config record and its log file before
    the job runs, so a process must know whether it is process 0 before Hydra
    starts. This composes the config from `argv` (writing nothing), reads its
    `distributed` group, and initialises JAX's distributed runtime if enabled.
    Where the overrides do not compose on their own (a `--multirun` sweep),
    the runtime starts later, in `run`, and Hydra's own records are written by
    every process.

    Args:
      argv: the command-line arguments: Hydra overrides and flags.

    Returns:
      Hydra overrides to append on a process other than 0, so that it writes
      nothing; empty on process 0 and when `distributed.enabled` is false.

    Raises:
      ConfigError: for invalid `distributed` settings or a failed start of the
        distributed runtime.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = compose("config", overrides=overrides)
        settings = OmegaConf.to_container(cfg, resolve=True).get("distributed", {})
    except (HydraException, OmegaConfBaseException):
        # Hydra reports the same mistake in its own words when it starts.
        return []
    config = from_dict(DistributedConfig, settings, prefix="distributed.")
    if not config.enabled:
        return []
    initialize(config)
    return [] if is_main_process() else list(QUIET_HYDRA_OVERRIDES)
