"""Stopping a run cleanly: SIGTERM and SIGINT ask the training loop to save and stop.

The first signal only sets a flag; the loop finishes its current optimizer step, writes a
resumable ``last.pt`` and raises `TrainingInterrupted`. A second signal acts as usual.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

# what signal.signal accepts and returns
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class TrainingInterrupted(Exception):
    """Raised after a signal once the run's state is saved; ``signum`` is the signal received."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Context manager: ``stop.signum`` becomes the first SIGTERM/SIGINT received inside it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, _Handler] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        for sig, handler in self._previous.items():  # a second signal gets the old behaviour
            signal.signal(sig, handler)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
