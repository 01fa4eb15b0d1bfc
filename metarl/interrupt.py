"""Stopping a run cleanly on Ctrl-C or SIGTERM, between two meta-steps."""

import signal
import threading
import types


class StopSignals:
    """While active, SIGINT and SIGTERM ask the run to stop instead of killing it.

    The host loop checks `requested` after each meta-step, saves a checkpoint
    and exits; a second signal of the same kind acts as usual (Ctrl-C twice
    interrupts at once). Outside the main thread, where Python cannot install
    handlers, it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        self.signum = signum
        signal.signal(signum, self._previous[signum])

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
