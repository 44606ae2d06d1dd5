"""Stopping a training run cleanly on SIGINT/SIGTERM: after the current step, with a checkpoint saved."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class StopRequest:
    """While active, SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once.

    Signal handlers can only be set from the main thread; elsewhere no signal is caught.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step, then saving a checkpoint (Ctrl-C again stops at once)", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
