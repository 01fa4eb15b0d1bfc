"""The console progress line and `python -m metarl.plot`."""

import json

import pytest

from metarl.logger import read_metrics, rewind_metrics
from metarl.plot import main as plot_main
from metarl.plot import plot_run
from metarl.progress import Progress, console_line, format_duration


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_times_from_after_compilation_and_estimates_time_left():
    clock = FakeClock()
    progress = Progress(
        total_steps=110, start_step=10, env_steps_per_meta_step=500, clock=clock
    )
    clock.now += 30.0  # the first meta-step compiles
    progress.step_done(11)
    assert progress.report() == (None, None)
    for step in range(12, 21):
        clock.now += 2.0
        progress.step_done(step)
    rate, left = progress.report()
    assert rate == pytest.approx(9 * 500 / 18.0)
    assert left == pytest.approx(2.0 * 90)
    clock.now += 1.0
    progress.step_done(21)
    rate, left = progress.report()
    assert rate == pytest.approx(500 / 1.0)
    assert left == pytest.approx((19.0 / 10) * 89)
    assert progress.session_seconds == pytest.approx(49.0)


@pytest.mark.parametrize(
    "seconds, text",
    [(None, "?"), (float("nan"), "?"), (42.4, "42s"), (185, "3m05s"), (3720, "1h02m")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_console_line_shows_step_rate_time_left_and_skips():
    record = {
        "episode/return": 1.5,
        "meta/loss": -0.25,
        "meta/grad_norm": 0.01,
        "meta/skipped": 1.0,
        "agent/skipped_updates": 4.0,
        "objective/discount": 0.99,
    }
    line = console_line(50, 200, 12000, 3400.0, 125.0, record)
    assert line.startswith("meta-step    50/200  25% | env-steps  12.00k |")
    assert "3.40k steps/s | left  2m05s | return    1.50 |" in line
    assert "skipped 1 meta, 4 agent updates" in line
    assert line.endswith("discount=0.99")
    quiet = console_line(1, 2, 10, None, None, {"episode/return": None})
    assert "? steps/s | left      ? | return     n/a" in quiet
    assert "skipped" not in quiet


def _write_metrics(run_dir, steps, torn=False):
    lines = [
        json.dumps(
            {
                "meta_step": s,
                "episode/return": s * 0.5 if s > 1 else None,
                "perf/env_steps": 100 * s,
                "meta/loss": -0.1 * s,
                "meta/grad_norm": 0.1 / s,
                "meta/skipped_total": 0,
                "loss/total": 1.0,
                "objective/discount": 0.99,
                "objective/lambda": 0.95,
            }
        )
        for s in steps
    ]
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"meta_step": 99, "episode/ret'
    (run_dir / "metrics.jsonl").write_text(text)


def test_plot_writes_png_of_learning_curves(tmp_path, capsys):
    _write_metrics(tmp_path, range(1, 8), torn=True)
    plot_main([str(tmp_path)])
    path = tmp_path / "learning_curves.png"
    assert capsys.readouterr().out.strip() == (
        f"metarl: learning curves written to {path}"
    )
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    # Seven panels on a 3-column grid of 4.2 x 3.2 inch panels at 100 dpi.
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert (width, height) == (1260, 960)
    out = plot_run(tmp_path, tmp_path / "other.png")
    assert out == tmp_path / "other.png" and out.is_file()


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "there is no run directory at"),
        ("empty_dir", "holds no metrics.jsonl; pass the folder a training run writes"),
        ("empty_file", "metrics.jsonl holds no records yet"),
    ],
)
def test_plot_errors_are_one_line(tmp_path, capsys, setup, message):
    run_dir = tmp_path / "run"
    if setup != "missing":
        run_dir.mkdir()
    if setup == "empty_file":
        (run_dir / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(run_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (run_dir / "learning_curves.png").exists()


def test_rewind_drops_records_after_the_checkpoint_and_torn_lines(tmp_path):
    _write_metrics(tmp_path, range(1, 8), torn=True)
    kept = rewind_metrics(tmp_path, 4)
    assert [r["meta_step"] for r in kept] == [1, 2, 3, 4]
    assert read_metrics(tmp_path) == kept
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4


def test_console_line_and_plot_show_each_games_return(tmp_path):
    record = {
        "episode/return": 3.0,
        "episode/asterix/return": 1.25,
        "episode/breakout/return": float("nan"),
        "episode/asterix/count": 4,
    }
    line = console_line(5, 10, 100, None, None, record)
    assert "| return asterix 1.25 breakout n/a |" in line

    records = [
        {
            "meta_step": s,
            "perf/env_steps": 100 * s,
            "episode/return": 1.0,
            "episode/asterix/return": 0.5,
            "episode/breakout/return": 2.0,
        }
        for s in (1, 2)
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n"
    )
    data = plot_run(tmp_path).read_bytes()
    # Five panels plus one per game: seven, on three rows (five take two).
    assert int.from_bytes(data[20:24], "big") == 960
