"""Several processes running one meta-step: connecting them, and who writes.

`jax.distributed.initialize` connects the processes before JAX touches a
device; after it, `jax.devices()` lists the devices of every process and the
mesh of `metarl.sharding` spans all hosts. Every process runs the same
compiled meta-step on its own devices, but only process 0 prints progress,
logs metrics and writes files, so a run leaves one set of outputs however
many hosts it used.

Whatever makes a process take part in a collective (a checkpoint gathers the
population) must be decided alike on every process; `agreed_signal` makes a
signal that reached some of them a stop for all.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

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


def gather_ints(value: int) -> list[int]:
    """`value` from every process, in process order.

    Collective with several processes: every process must call it at the
    same point of the run.

    Args:
      value: a number that fits in 32 bits.

    Returns:
      One number per process; `[value]` in a run of one process.
    """
    if jax.process_count() == 1:
        return [value]
    gathered = multihost_utils.process_allgather(np.int32(value))
    return [int(v) for v in np.ravel(gathered)]


# Longest path `main_process_path` passes on, in bytes (Linux's PATH_MAX).
MAX_PATH_BYTES = 4096


def main_process_path(path: Path) -> Path:
    """Process 0's `path`, made absolute, on every process.

    A new run's folder is named by process 0 (Hydra's dated folder); the other
    processes run in a folder of their own that they never write to, and use
    process 0's only to name it in their messages.

    Collective with several processes, like `gather_ints`.

    Args:
      path: this process's path.

    Returns:
      `path.absolute()` as process 0 has it; `path` in a run of one process.

    Raises:
      ConfigError: if process 0's path is longer than `MAX_PATH_BYTES`.
    """
    if jax.process_count() == 1:
        return path
    encoded = str(path.absolute()).encode()
    too_long = len(encoded) > MAX_PATH_BYTES
    buffer = np.zeros(MAX_PATH_BYTES + 1, np.uint8)
    if not too_long:
        buffer[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    else:
        buffer[-1] = 1
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    if received[-1]:
        raise ConfigError(
            f"process 0's run directory is longer than {MAX_PATH_BYTES} bytes; "
            "pick a shorter hydra.run.dir"
        )
    return Path(received[:-1].tobytes().rstrip(b"\0").decode())


def agreed_signal(signum: int | None) -> int | None:
    """The stop signal that any process of the run received, or None.

    A signal reaches the processes of a run at different moments, or only
    some of them (Ctrl-C on one host). Each stop saves a checkpoint, which is
    collective, so the processes agree after each meta-step on whether to
    stop: all of them, or none.

    Args:
      signum: the signal this process received since the run started, or None.

    Returns:
      The signal of the lowest-numbered process that received one, or None.
      Collective with several processes, like `gather_ints`.
    """
    if jax.process_count() == 1:
        return signum
    received = [s for s in gather_ints(signum or 0) if s]
    return received[0] if received else None


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
      nothing; empty on process 0 and when `distributed.enabled` is false. A
      resumed run keeps its `hydra.run.dir` on every process: all of them read
      its checkpoints, and the folder exists already, so Hydra creates
      nothing there.

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
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException):
        # Hydra reports the same mistake in its own words when it starts.
        return []
    settings = resolved.get("distributed", {})
    config = from_dict(DistributedConfig, settings, prefix="distributed.")
    if not config.enabled:
        return []
    initialize(config)
    if is_main_process():
        return []
    quiet = list(QUIET_HYDRA_OVERRIDES)
    if resolved.get("resume", False) is not False:
        quiet.remove("hydra.run.dir=.")
    return quiet
