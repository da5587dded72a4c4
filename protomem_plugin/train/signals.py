"""SIGTERM while training (what cluster schedulers and torchrun send before they kill a process).

While :class:`StopRequest` is entered, SIGTERM no longer ends the process: the handler only records
it. The training loop reads :attr:`StopRequest.requested` at its per-step agreement (all-reduced
with the step's finiteness flag, so every rank stops after the same step), finishes that step,
writes a checkpoint on every rank and returns. On exit the previous handlers are restored.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """Records SIGTERM instead of dying; a no-op outside the main thread (handlers cannot be set there)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)  # nothing else here: the loop acts on it between steps

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back (a signal received meanwhile stays in :attr:`received`)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
