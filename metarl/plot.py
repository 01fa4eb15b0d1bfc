"""`python -m metarl.plot RUN_DIR`: a run's learning curves, drawn to a PNG.

Reads `RUN_DIR/metrics.jsonl` (also while the run is going) and draws the
episode return against environment steps, the meta-loss, the meta-gradient
norm, skipped updates and each parameter of the objective against meta-steps.
Writes `RUN_DIR/learning_curves.png` unless `--out` says otherwise.
"""

import argparse
import math
import sys
from pathlib import Path

from metarl.cli import fail
from metarl.logger import METRICS_FILE, read_metrics
from metarl.progress import env_of

PLOT_FILE = "learning_curves.png"


class PlotError(ValueError):
    """A run directory with nothing to plot; the message says what to pass."""


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _series(records: list[dict], x_key: str, y_key: str) -> tuple[list, list]:
    pairs = [(r.get(x_key), r.get(y_key)) for r in records]
    pairs = [(x, y) for x, y in pairs if _finite(x) and _finite(y)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draws the learning curves of the run in `run_dir` to a PNG file.

    Args:
      run_dir: a run directory, holding `metrics.jsonl`.
      out: the image to write (default: `RUN_DIR/learning_curves.png`).

    Returns:
      The path of the image.

    Raises:
      PlotError: if `run_dir` is not a directory or holds no metrics.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"there is no run directory at {run_dir}; pass one")
    if not (run_dir / METRICS_FILE).is_file():
        raise PlotError(
            f"{run_dir} holds no {METRICS_FILE}; pass the folder a training run "
            "writes (hydra.run.dir)"
        )
    records = read_metrics(run_dir)
    if not records:
        raise PlotError(
            f"{run_dir / METRICS_FILE} holds no records yet; a run writes one "
            "every logger.log_every meta-steps"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective_keys = sorted(
        {k for r in records for k in r if k.startswith("objective/")}
    )
    panels = [
        ("perf/env_steps", "episode/return", "environment steps", "episode return"),
        ("meta_step", "meta/loss", "meta-step", "meta-loss"),
        ("meta_step", "meta/grad_norm", "meta-step", "meta-gradient norm"),
        ("meta_step", "meta/skipped_total", "meta-step", "skipped meta-updates"),
        ("meta_step", "loss/total", "meta-step", "agent loss"),
    ]
    # A population over several games: each game's return in its own panel,
    # since their scales differ.
    env_keys = sorted({k for r in records for k in r if env_of(k, "return")})
    panels[1:1] = [
        ("perf/env_steps", key, "environment steps", f"{env_of(key, 'return')} return")
        for key in env_keys
    ]
    panels += [
        ("meta_step", key, "meta-step", key.split("/", 1)[1]) for key in objective_keys
    ]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows))
    for ax, (x_key, y_key, x_label, y_label) in zip(axes.flat, panels, strict=False):
        xs, ys = _series(records, x_key, y_key)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_xlabel(x_label)
        ax.set_title(y_label)
        ax.grid(alpha=0.3)
        if y_key == "meta/grad_norm" and ys and min(ys) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: meta-step {records[-1]['meta_step']}")
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / PLOT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m metarl.plot RUN_DIR [--out FILE]`."""
    parser = argparse.ArgumentParser(
        prog="python -m metarl.plot", description="Draws a run's learning curves."
    )
    parser.add_argument("run_dir", help="the run directory (it holds metrics.jsonl)")
    parser.add_argument("--out", help=f"the PNG to write (default RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except PlotError as error:
        fail(str(error))
    print(f"metarl: learning curves written to {path}")


if __name__ == "__main__":
    main()
