"""Console progress of a run: meta-step, environment steps per second, time left.

One plain line per report rather than a redrawn bar: it reads the same in a
terminal, a log file and a batch system's output.
"""

import math
import time
from collections.abc import Callable


def format_count(n: float) -> str:
    """`n` with a k/M/G suffix and three significant figures or so."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_duration(seconds: float | None) -> str:
    """`seconds` as `1h02m`, `3m05s` or `42s`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Times the meta-steps of a run and estimates the time left.

    The first meta-step of a session includes compilation, so rates and the
    time left are measured from the moment it finished.

    Args:
      total_steps: the meta-step the run ends at.
      start_step: the meta-step the session starts from (0, or the step of
        the checkpoint it resumed).
      env_steps_per_meta_step: environment steps one meta-step takes.
      clock: seconds, monotonic; replaceable in tests.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        env_steps_per_meta_step: int,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total_steps = total_steps
        self.env_steps_per_meta_step = env_steps_per_meta_step
        self._clock = clock
        self._started = clock()
        self._timed_from: tuple[int, float] | None = None
        self._window: tuple[int, float] | None = None
        self._last_step = start_step

    @property
    def session_seconds(self) -> float:
        """Wall time since this session started, compilation included."""
        return self._clock() - self._started

    def step_done(self, step: int) -> None:
        """Records that meta-step `step` has finished (its results are ready)."""
        now = self._clock()
        if self._timed_from is None:
            self._timed_from = (step, now)
            self._window = (step, now)
        self._last_step = step

    def report(self) -> tuple[float | None, float | None]:
        """Environment steps per second since the last report, and seconds left.

        Returns:
          `(env_steps_per_second, seconds_left)`; None where nothing has been
          timed yet (only the compiling step has run).
        """
        now = self._clock()
        rate = seconds_left = None
        if self._window is not None and self._last_step > self._window[0]:
            steps = self._last_step - self._window[0]
            seconds = max(now - self._window[1], 1e-9)
            rate = steps * self.env_steps_per_meta_step / seconds
        if self._timed_from is not None and self._last_step > self._timed_from[0]:
            per_step = (now - self._timed_from[1]) / (
                self._last_step - self._timed_from[0]
            )
            seconds_left = per_step * (self.total_steps - self._last_step)
        if self._window is not None:
            self._window = (self._last_step, now)
        return rate, seconds_left


def env_of(key: str, field: str) -> str | None:
    """The environment of a metric `episode/<env>/<field>`, else None."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "episode" and parts[2] == field:
        return parts[1]
    return None


def console_line(
    step: int,
    total: int,
    env_steps: int,
    rate: float | None,
    seconds_left: float | None,
    record: dict,
) -> str:
    """One progress line: where the run is, how fast it goes, how it learns.

    Args:
      step: the meta-step just finished.
      total: the meta-step the run ends at.
      env_steps: environment steps so far.
      rate: environment steps per second (None: not measured yet).
      seconds_left: the estimated time to the end (None: unknown).
      record: the metrics record of the meta-steps since the last line.

    Returns:
      The line, without a newline.
    """
    objective = " ".join(
        f"{k.split('/', 1)[1]}={v:.4g}"
        for k, v in record.items()
        if k.startswith("objective/") and v is not None
    )

    def number(value) -> str:
        if value is None or not math.isfinite(value):
            return "    n/a"
        return f"{value:7.2f}"

    # A population over several games shows each game's return: their scales
    # differ, so one mean over all episodes would say little.
    per_env = {
        env_of(key, "return"): value
        for key, value in record.items()
        if env_of(key, "return")
    }
    if per_env:
        ret_text = " ".join(f"{env} {number(v).strip()}" for env, v in per_env.items())
    else:
        ret_text = number(record.get("episode/return"))
    rate_text = format_count(rate) if rate is not None else "?"
    skipped = int(record.get("meta/skipped", 0)) + int(
        record.get("agent/skipped_updates", 0)
    )
    skip_text = (
        f" | skipped {int(record.get('meta/skipped', 0))} meta, "
        f"{int(record.get('agent/skipped_updates', 0))} agent updates"
        if skipped
        else ""
    )
    meta_loss = record.get("meta/loss")
    loss_text = f"{meta_loss:+.4f}" if meta_loss is not None else "n/a"
    grad_norm = record.get("meta/grad_norm")
    grad_text = f"{grad_norm:.3g}" if grad_norm is not None else "n/a"
    return (
        f"meta-step {step:>5}/{total} {100 * step / total:3.0f}% | env-steps "
        f"{format_count(env_steps):>7} | {rate_text:>6} steps/s | left "
        f"{format_duration(seconds_left):>6} | return {ret_text} | meta-loss "
        f"{loss_text} | meta-grad-norm {grad_text}{skip_text} | {objective}"
    )
