"""Checkpoints of a whole meta-training run, and resuming from them.

A checkpoint is an orbax step folder `RUN_DIR/checkpoints/<meta-step>/` with
two items: `state`, every array of the trainer's `MetaState` (objective and
its optimiser, each agent's parameters, optimiser and environments, the
random keys as raw key data, the step and skip counters), and `host`, a JSON
record of what lives on the host (environment steps, skipped agent updates,
the current streak of skipped meta-updates, wall time, the W&B run id) and of
the configuration that produced it.

orbax writes each checkpoint under `<meta-step>.orbax-checkpoint-tmp` and
renames the folder when every file is on disk, so a run killed mid-save
leaves only a temporary folder, which is never read and is removed when the
run resumes; the checkpoints before it stay intact.

With several processes, the population is split over the hosts. Saving first
gathers every array to every host, then process 0 alone writes; resuming,
every process reads the whole checkpoint from the same folder (a filesystem
shared by the hosts) and keeps its own devices' part of each array.
"""

import copy
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1

# Settings each command gives afresh, never taken from the run it resumes: how
# this command's processes connect (a new coordinator port, another process
# count) says nothing about the run, and the saved ones would point a resumed
# process at a coordinator that is gone.
PER_COMMAND_SETTINGS = ("distributed",)

# Settings a resumed run may change: they steer the host loop and its outputs,
# not the numbers the meta-steps compute.
RESUMABLE_SETTINGS = (
    "resume",
    "logger",
    "checkpoint",
    "meta.steps",
    "meta.max_consecutive_skips",
    "objective.init_from",
    *PER_COMMAND_SETTINGS,
)

# Settings a resumed run may change on purpose, to rescue a run that diverged:
# step sizes, which no saved array depends on. The run then departs from the
# one that was interrupted, and says so.
TUNABLE_SETTINGS = ("meta.learning_rate", "agent.optimizer.learning_rate")

# Settings of how the meta-gradient is computed, which trade memory for time:
# a resumed run may change them (to fit in less memory, say) and computes the
# same meta-gradients up to rounding.
GRADIENT_SETTINGS = (
    "meta.grad",
    "meta.checkpoint_every",
    "meta.store_rollout",
    "meta.replay_rollout",
    "meta.store_inner_grad",
)


def resume_notice(change: str) -> str:
    """What a resumed run says about one `check_compatible` change line."""
    if change.split(":")[0] in GRADIENT_SETTINGS:
        effect = "the meta-gradients are the same up to rounding"
    else:
        effect = "from here the run departs from the one that stopped"
    return f"metarl: resuming with {change}; {effect}"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not fit the configuration."""


@dataclasses.dataclass
class HostCounters:
    """What a run counts on the host, saved with each checkpoint.

    Attributes:
      env_steps: environment steps taken by the whole population.
      agent_skipped: agent updates skipped for non-finite numbers.
      skip_streak: meta-updates skipped in a row up to this meta-step.
      wall_seconds: wall time spent in the run, over all its sessions.
      wandb_id: the W&B run's id, so a resumed run logs to the same run.
    """

    env_steps: int = 0
    agent_skipped: int = 0
    skip_streak: int = 0
    wall_seconds: float = 0.0
    wandb_id: str | None = None


def _orbax():
    import orbax.checkpoint as ocp

    # orbax reports every file it writes at INFO level, which would bury the
    # progress lines under Hydra's console logging.
    logging.getLogger("absl").setLevel(logging.WARNING)
    return ocp


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )


def encode_keys(tree) -> Any:
    """`tree` with typed PRNG key arrays replaced by their raw `uint32` data.

    Args:
      tree: a pytree of arrays, some of them typed keys (`jax.random.key`).

    Returns:
      The same tree; each key array becomes `jax.random.key_data` of it.
    """
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def decode_keys(tree, template) -> Any:
    """Undoes `encode_keys`, wrapping key data like the keys of `template`.

    Args:
      tree: a tree that `encode_keys` produced.
      template: a tree of the same structure with the typed keys in place;
        each key's implementation (threefry, rbg, ...) is taken from it.

    Returns:
      `tree` with typed key arrays where `template` has them.
    """

    def decode(x, like):
        if _is_key(like):
            return jax.random.wrap_key_data(x, impl=jax.random.key_impl(like))
        return x

    return jax.tree.map(decode, tree, template)


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_record(config) -> dict:
    """The configuration as JSON values, as checkpoints record it.

    Args:
      config: a `TrainConfig`.

    Returns:
      Nested dicts of JSON values (tuples become lists).
    """
    return json.loads(json.dumps(dataclasses.asdict(config)))


def check_compatible(saved: dict, config, run_dir: Path) -> list[str]:
    """Raises unless `config` can continue the run the saved config started.

    Args:
      saved: `config_record` of the configuration that wrote the checkpoint.
      config: the configuration of the run that would resume it.
      run_dir: the run's folder, for the message.

    Returns:
      One `key: old -> new` line per changed `TUNABLE_SETTINGS` or
      `GRADIENT_SETTINGS` entry.

    Raises:
      CheckpointError: naming the first other setting that differs.
    """
    old, new = _flatten(saved), _flatten(config_record(config))
    changed = []
    for key in sorted(set(old) | set(new)):
        if any(key == s or key.startswith(s + ".") for s in RESUMABLE_SETTINGS):
            continue
        if old.get(key) == new.get(key):
            continue
        if key in TUNABLE_SETTINGS or key in GRADIENT_SETTINGS:
            changed.append(f"{key}: {old.get(key)} -> {new.get(key)}")
            continue
        raise CheckpointError(
            f"cannot resume {run_dir}: it was trained with {key}="
            f"{json.dumps(old.get(key))} but this run has {key}="
            f"{json.dumps(new.get(key))}; drop that override to resume, or "
            "start a new run in another directory"
        )
    return changed


class Checkpointer:
    """Saves and restores `MetaState`s under `RUN_DIR/checkpoints` with orbax.

    Saving is synchronous: the meta-step donates its input state, so the
    arrays must be copied out before the next meta-step reuses their memory.

    Every process of a run makes one. `save` is collective (every process
    calls it at the same meta-step) and only process 0 writes; `restore` reads
    on every process, from the same folder.

    Args:
      run_dir: the run's folder.
      keep: how many checkpoints to keep; older ones are deleted.
    """

    def __init__(self, run_dir: str | Path, keep: int = 3):
        ocp = _orbax()
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / CHECKPOINT_DIR
        self._ocp = ocp
        # Each process uses orbax on its own, on numpy copies of whole arrays:
        # process 0 writes, the others only read. orbax's multi-host saving
        # would instead have every process write its own shards and meet the
        # others at barriers inside orbax, which hang as soon as one process
        # saves alone or not at all (a signal, an error); with a single active
        # process orbax skips every barrier, and the one step that all
        # processes take together is the gathering before it (`save`).
        me = jax.process_index()
        self._writes = me == 0
        self._manager = ocp.CheckpointManager(
            self.directory.absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=False,
                create=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=me, active_processes={me}
                ),
            ),
        )

    def steps(self) -> list[int]:
        """The meta-steps of the complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The meta-step of the newest complete checkpoint, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, state, counters: HostCounters, config) -> Path:
        """Writes `state` and `counters` as the checkpoint of `state.step`.

        With several processes every one of them must call it at the same
        meta-step: the arrays are gathered to every host first, which takes
        all of them. Only process 0 writes; the others return once gathered.

        Args:
          state: the trainer's `MetaState`; only its `step` field is read by
            name, the rest is saved as whatever tree of arrays it is.
          counters: the host-side counters at that meta-step.
          config: the run's configuration, recorded for resuming.

        Returns:
          The checkpoint's folder (written by process 0).
        """
        ocp = self._ocp
        step = int(state.step)
        arrays = gather_to_host(encode_keys(state))
        if not self._writes:
            return self.directory / str(step)
        self.directory.mkdir(parents=True, exist_ok=True)
        host = {
            "format_version": FORMAT_VERSION,
            "meta_step": step,
            "counters": dataclasses.asdict(counters),
            "config": config_record(config),
        }
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays),
                host=ocp.args.JsonSave(host),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        return self.directory / str(step)

    def _damaged(self, step: int, error: Exception) -> CheckpointError:
        earlier = [s for s in self.steps() if s < step]
        fallback = (
            f"delete it to resume from meta-step {earlier[-1]}"
            if earlier
            else "delete the run directory and start again"
        )
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return CheckpointError(
            f"checkpoint {self.directory / str(step)} cannot be read "
            f"({type(error).__name__}: {reason[:200]}); {fallback}"
        )

    def read_host(self, step: int) -> dict:
        """The JSON record of checkpoint `step`: counters and configuration.

        Raises:
          CheckpointError: if the record is missing or damaged, or written by a
            newer metarl.
        """
        ocp = self._ocp
        try:
            host = self._manager.restore(
                step, args=ocp.args.Composite(host=ocp.args.JsonRestore())
            ).host
        except Exception as error:  # orbax raises many types for a bad folder
            raise self._damaged(step, error) from error
        if not isinstance(host, dict) or not isinstance(host.get("config"), dict):
            raise self._damaged(step, ValueError("its host record is incomplete"))
        version = host.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} has format version "
                f"{version!r}, which this metarl (format {FORMAT_VERSION}) cannot "
                "read; upgrade metarl"
            )
        return host

    def check_resumable(self, step: int, config) -> list[str]:
        """Raises unless checkpoint `step` can be read and continued by `config`.

        Returns:
          The step sizes and meta-gradient settings `config` changes, as
          `check_compatible` lists them.

        Raises:
          CheckpointError: if its record is damaged, or `config` differs from
            the configuration that wrote it in a setting that changes the maths.
        """
        return check_compatible(self.read_host(step)["config"], config, self.run_dir)

    def restore(self, step: int, template) -> tuple[Any, HostCounters]:
        """Reads checkpoint `step` back into the structure of `template`.

        Every process reads the whole checkpoint and keeps the part of each
        array that its devices hold, so all of them must see the same folder.

        Args:
          step: the meta-step of the checkpoint.
          template: a `MetaState` of the same configuration (for instance
            `trainer.init(seed)`); its shapes, dtypes, shardings and key types
            are those restored.

        Returns:
          `(state, counters)`.

        Raises:
          CheckpointError: if a file is missing or damaged, or the arrays do not
            fit `template`.
        """
        ocp = self._ocp
        host = self.read_host(step)
        encoded = encode_keys(template)
        # Without shardings orbax reads each array whole, into host memory.
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), encoded
        )
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
            ).state
        except Exception as error:  # orbax raises many types for a bad folder
            raise self._damaged(step, error) from error
        for got, want in zip(
            jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True
        ):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise self._damaged(
                    step, ValueError("its arrays do not fit this configuration")
                )
        if not all(np.all(np.isfinite(x)) for x in _float_leaves(restored)):
            raise self._damaged(step, ValueError("it holds non-finite numbers"))
        try:
            counters = HostCounters(**host["counters"])
        except TypeError as error:
            raise self._damaged(step, error) from error
        if int(restored.step) != step or not math.isfinite(counters.wall_seconds):
            raise self._damaged(step, ValueError("its counters are inconsistent"))
        restored = jax.tree.map(_placed_like, restored, encoded)
        return decode_keys(restored, template), counters

    def close(self) -> None:
        """Releases orbax's resources."""
        self._manager.close()


def gather_to_host(tree) -> Any:
    """Host copies of the arrays of `tree`, whole, on every process.

    With several processes, an array split over the hosts is gathered from
    all of them, so every process must call this with the same tree at the
    same point of the run.

    Args:
      tree: a pytree of arrays, none of them typed keys (see `encode_keys`).

    Returns:
      The same tree of numpy arrays.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _placed_like(restored: np.ndarray, like) -> jax.Array:
    """`restored` on the devices where `like` is, split as `like` is.

    Each process supplies only the pieces its own devices hold. An array of
    `like` left uncommitted to a device stays uncommitted: a jitted function
    called with committed arrays where it was called with uncommitted ones
    before compiles again, so a resumed run in the same process would
    recompile.
    """
    restored = np.asarray(restored)
    if isinstance(like, jax.Array) and like.committed:
        return jax.make_array_from_callback(
            restored.shape, like.sharding, lambda index: np.asarray(restored[index])
        )
    return jax.numpy.asarray(restored)


def _float_leaves(tree) -> list:
    return [
        x for x in jax.tree.leaves(tree) if jax.dtypes.issubdtype(x.dtype, np.inexact)
    ]


def find_run(resume: bool | str, hydra_dir: Path) -> tuple[Path, bool]:
    """The run directory and whether the run continues an earlier one.

    Args:
      resume: the `resume` setting: False, True (the run directory Hydra
        picked) or the path of a run directory.
      hydra_dir: the run directory Hydra picked.

    Returns:
      `(run_dir, resuming)`.

    Raises:
      CheckpointError: if a run to resume has no checkpoint, or a new run
        would write over an earlier one.
    """
    if resume is False:
        if (hydra_dir / CHECKPOINT_DIR).is_dir() or (
            hydra_dir / "metrics.jsonl"
        ).is_file():
            raise CheckpointError(
                f"{hydra_dir} already holds a run; add resume=true to continue it, "
                "or pick another hydra.run.dir"
            )
        return hydra_dir, False
    run_dir = hydra_dir if resume is True else Path(resume).expanduser()
    if not run_dir.is_dir():
        raise CheckpointError(
            f"resume: there is no run directory at {run_dir}; pass resume=PATH with "
            "the folder of an earlier run"
        )
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        hint = (
            "; resume=true continues the run in hydra.run.dir, so pass the same "
            "hydra.run.dir or resume=PATH"
            if resume is True
            else ""
        )
        raise CheckpointError(
            f"resume: {run_dir} holds no checkpoints/ folder, so there is nothing "
            f"to resume{hint}"
        )
    return run_dir, True


def resumed_settings(run_dir: Path, resolved: dict, keys: list[str]) -> dict:
    """The settings of a resumed run: the saved run's, with `keys` from `resolved`.

    A resumed run keeps the configuration it was started with; only what the
    command line sets again (`meta.steps=2000`, `logger.mode=disabled`) comes
    from the new command, so that resuming needs no repeated overrides. The
    `distributed` settings always come from the new command.

    Args:
      run_dir: the run directory being resumed.
      resolved: the configuration Hydra composed for this command.
      keys: the dotted settings and group names set on the command line.

    Returns:
      The merged settings, plain values.

    Raises:
      CheckpointError: if the run has no readable checkpoint.
    """
    checkpointer = Checkpointer(run_dir)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise CheckpointError(
                f"resume: {checkpointer.directory} holds no complete checkpoint "
                "(the run stopped before its first one was written); start a new "
                "run"
            )
        merged = copy.deepcopy(checkpointer.read_host(step)["config"])
    finally:
        checkpointer.close()
    for key in [*keys, *PER_COMMAND_SETTINGS]:
        *parents, last = key.split(".")
        source, target = resolved, merged
        for part in parents:
            source = source.get(part, {})
            target = target.setdefault(part, {})
        if last in source:
            target[last] = copy.deepcopy(source[last])
    return merged
