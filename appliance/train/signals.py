"""Stopping a run cleanly: the first SIGINT or SIGTERM asks the loop to finish its step, save a
checkpoint and exit 130 / 143; a second Ctrl-C leaves at once (checkpoints are renamed into
place whole, so the last good one survives)."""

from __future__ import annotations

import os
import signal
from typing import Any


class StopSignals:
    """First SIGINT/SIGTERM: stop after this step and save. Second SIGINT: leave now."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            os._exit(130)
        self.received = signum
