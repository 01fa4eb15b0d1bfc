"""One host-side logger for a run: a JSON-lines file and W&B."""

import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"

# W&B's own names for its modes, beside metarl's.
_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}

# Metric groups plotted against meta-steps; episode returns are plotted
# against environment steps, the usual x-axis of a learning curve.
_META_STEP_GROUPS = ("meta", "agent", "loss", "objective", "perf")


def _clean(value: Any) -> Any:
    """A JSON-safe scalar: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def wandb_mode(configured: str | None) -> str:
    """The W&B mode of a run: `logger.mode` if set, else `WANDB_MODE`, else offline.

    Args:
      configured: the `logger.mode` setting (None: not set).

    Returns:
      "offline", "online" or "disabled".

    Raises:
      ConfigError: if `WANDB_MODE` holds a mode W&B does not have.
    """
    from metarl.config import LOGGER_MODES, ConfigError

    if configured is not None:
        return configured
    value = os.environ.get("WANDB_MODE", "").strip().lower()
    if not value:
        return "offline"
    value = _WANDB_MODE_ALIASES.get(value, value)
    if value not in LOGGER_MODES:
        raise ConfigError(
            f"WANDB_MODE must be one of {', '.join(LOGGER_MODES)}, got "
            f"'{os.environ['WANDB_MODE']}'; fix or unset it, or pass logger.mode=..."
        )
    return value


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of `RUN_DIR/metrics.jsonl`, skipping lines a crash cut short.

    Args:
      run_dir: the run's folder.

    Returns:
      The records in file order (an empty list if there is no file).
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("meta_step"), int):
            records.append(record)
    return records


def rewind_metrics(run_dir: str | os.PathLike, step: int) -> list[dict]:
    """Drops the records after meta-step `step`, which a resumed run redoes.

    The file is rewritten to a temporary file and renamed over the old one,
    so a crash here leaves either the old or the new file.

    Args:
      run_dir: the run's folder.
      step: the meta-step of the checkpoint the run resumes from.

    Returns:
      The records kept.
    """
    path = Path(run_dir) / METRICS_FILE
    records = [r for r in read_metrics(run_dir) if r["meta_step"] <= step]
    if path.is_file():
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, suffix=".jsonl", delete=False
        ) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(f.name, path)
    return records


class RunLogger:
    """Writes each record to `metrics.jsonl`, and to W&B when that works.

    In W&B, metrics are grouped by their prefix (`meta/`, `agent/`, `loss/`,
    `objective/`, `perf/` against meta-steps; `episode/` against environment
    steps), and `log_charts` draws two custom charts, the learning curve and
    the objective's parameters over meta-steps. If W&B fails to start or to
    log, the logger says so once on stderr and carries on with the local
    file, so a broken logger never stops a run.

    Args:
      run_dir: the run's folder; `metrics.jsonl` and `wandb/` go there.
      config: the resolved configuration, recorded with the W&B run.
      mode: "offline", "online" or "disabled".
      project: the W&B project.
      entity: the W&B entity (None: the user's default).
      name: the W&B run name (None: W&B picks one).
      run_id: the id of an earlier W&B run to continue (None: a new run).
      history: records already in `metrics.jsonl`, for the charts.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict,
        mode: str = "offline",
        project: str = "metarl",
        entity: str | None = None,
        name: str | None = None,
        run_id: str | None = None,
        history: list[dict] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Held open for the whole run and closed in `close`.
        self._file = open(self.run_dir / METRICS_FILE, "a")  # noqa: SIM115
        self._history = list(history or [])
        self._wandb = None
        self._warned = False
        if mode != "disabled":
            self._start_wandb(config, mode, project, entity, name, run_id)

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

    def _call(self, what: str, fn: Callable[[Any], Any]) -> None:
        """Runs `fn(run)` if W&B is up; the first failure turns W&B off."""
        if self._wandb is None:
            return
        try:
            fn(self._wandb)
        except Exception as error:  # any failure of an optional logger
            self._warn(what, error)
            self._wandb = None

    def _start_wandb(self, config, mode, project, entity, name, run_id) -> None:
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
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(silent=True),
            )
        except Exception as error:  # any failure of an optional logger
            self._wandb = None
            self._warn("start", error)
            return
        self._call("setup", _define_metrics)

    @property
    def run_id(self) -> str | None:
        """The W&B run's id, if one started."""
        return None if self._wandb is None else self._wandb.id

    @property
    def wandb_dir(self) -> Path | None:
        """The folder of the W&B run, if one started."""
        if self._wandb is None:
            return None
        return Path(self._wandb.dir).parent

    def log(self, record: dict[str, Any], step: int) -> None:
        """Appends `record` (flat scalars) at meta-step `step` everywhere."""
        record = {"meta_step": step, **{k: _clean(v) for k, v in record.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._history.append(record)
        payload = {k: v for k, v in record.items() if v is not None}
        if "perf/env_steps" in record:
            payload["env_steps"] = record["perf/env_steps"]
        # The meta-step is a logged value, not W&B's own step, so a resumed run
        # may log a step again without W&B dropping it as out of order.
        self._call("logging", lambda run: run.log(payload))

    def log_charts(self) -> None:
        """Logs the learning curve and the objective's parameters as W&B charts."""
        if self._wandb is None or not self._history:
            return
        self._call("charts", lambda run: _log_charts(run, self._history))

    def log_objective(self, path: str | os.PathLike, step: int) -> None:
        """Logs the saved objective in the folder `path` as a W&B artifact.

        Args:
          path: the folder `save_objective` wrote.
          step: the meta-step of its parameters, recorded as an alias.
        """

        def log_artifact(run):
            import wandb

            artifact = wandb.Artifact(
                f"objective-{run.id}", type="objective", metadata={"meta_step": step}
            )
            for file in sorted(Path(path).iterdir()):
                if file.is_file():
                    artifact.add_file(str(file), name=file.name)
            run.log_artifact(artifact, aliases=["latest", f"meta-step-{step}"])

        self._call("artifact", log_artifact)

    def close(self) -> None:
        """Flushes and closes the file and finishes the W&B run."""
        self._file.close()
        self._call("finish", lambda run: run.finish())
        self._wandb = None


def _define_metrics(run) -> None:
    run.define_metric("meta_step")
    run.define_metric("env_steps")
    for group in _META_STEP_GROUPS:
        run.define_metric(f"{group}/*", step_metric="meta_step")
    run.define_metric("episode/*", step_metric="env_steps")


def _log_charts(run, history: list[dict]) -> None:
    import wandb

    curve = [
        [r["perf/env_steps"], r["episode/return"]]
        for r in history
        if r.get("episode/return") is not None and "perf/env_steps" in r
    ]
    names = sorted({k for r in history for k in r if k.startswith("objective/")})
    charts = {}
    if curve:
        table = wandb.Table(data=curve, columns=["env_steps", "return"])
        charts["charts/learning_curve"] = wandb.plot.line(
            table, "env_steps", "return", title="Learning curve: episode return"
        )
    if names:
        rows = [r for r in history if all(r.get(n) is not None for n in names)]
        charts["charts/objective"] = wandb.plot.line_series(
            xs=[r["meta_step"] for r in rows],
            ys=[[r[n] for r in rows] for n in names],
            keys=[n.split("/", 1)[1] for n in names],
            title="Objective parameters",
            xname="meta-step",
        )
    if charts:
        run.log(charts)


class NullLogger:
    """A logger that writes nothing, for processes other than 0.

    It takes the arguments of `RunLogger` and ignores them.
    """

    wandb_dir = None
    run_id = None

    def __init__(self, *args: Any, **kwargs: Any):
        del args, kwargs

    def log(self, record: dict[str, Any], step: int) -> None:
        """Drops `record`."""
        del record, step

    def log_charts(self) -> None:
        """Draws nothing."""

    def log_objective(self, path: str | os.PathLike, step: int) -> None:
        """Uploads nothing."""
        del path, step

    def close(self) -> None:
        """Nothing to close."""
