"""One host-side logger for a run: console lines, a JSON-lines file and W&B."""

import json
import math
import os
import sys
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """A JSON-safe scalar: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Writes each record to `metrics.jsonl`, and to W&B when that works.

    W&B runs offline unless `mode="online"`. If it fails to start or to log,
    the logger says so once on stderr and carries on with the local file, so a
    broken logger never stops a run.

    Args:
      run_dir: the run's folder; `metrics.jsonl` and `wandb/` go there.
      config: the resolved configuration, recorded with the W&B run.
      mode: "offline", "online" or "disabled".
      project: the W&B project.
      entity: the W&B entity (None: the user's default).
      name: the W&B run name (None: W&B picks one).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict,
        mode: str = "offline",
        project: str = "metarl",
        entity: str | None = None,
        name: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Held open for the whole run and closed in `close`.
        self._file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115
        self._wandb = None
        self._warned = False
        if mode != "disabled":
            self._start_wandb(config, mode, project, entity, name)

    def _warn(self, what: str, error: Exception) -> None:
        if not self._warned:
            first_line = (
                str(error).strip().splitlines()[0] if str(error).strip() else ""
            )
            print(
                f"metarl: W&B {what} failed ({type(error).__name__}: {first_line}); "
                "continuing with local logs only",
                file=sys.stderr,
            )
            self._warned = True

    def _start_wandb(self, config, mode, project, entity, name) -> None:
        # W&B's banners and tips would drown the progress lines.
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            self._wandb = wandb.init(
                project=project,
                entity=entity,
                name=name,
                mode=mode,
                dir=str(self.run_dir),
                config=config,
                settings=wandb.Settings(silent=True),
            )
        except Exception as error:  # any failure of an optional logger
            self._wandb = None
            self._warn("start", error)

    @property
    def wandb_dir(self) -> Path | None:
        """The folder of the W&B run, if one started."""
        if self._wandb is None:
            return None
        return Path(self._wandb.dir).parent

    def log(self, record: dict[str, Any], step: int) -> None:
        """Appends `record` (flat scalars) at meta-step `step` everywhere."""
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps({"meta_step": step, **record}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            try:
                self._wandb.log(
                    {k: v for k, v in record.items() if v is not None}, step=step
                )
            except Exception as error:  # any failure of an optional logger
                self._warn("logging", error)
                self._wandb = None

    def close(self) -> None:
        """Flushes and closes the file and finishes the W&B run."""
        self._file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as error:  # any failure of an optional logger
                self._warn("finish", error)
            self._wandb = None


class NullLogger:
    """A logger that writes nothing, for processes other than 0.

    It takes the arguments of `RunLogger` and ignores them.
    """

    wandb_dir = None

    def __init__(self, *args: Any, **kwargs: Any):
        del args, kwargs

    def log(self, record: dict[str, Any], step: int) -> None:
        """Drops `record`."""
        del record, step

    def close(self) -> None:
        """Nothing to close."""
