"""A progress line on stderr: redrawn in place on a terminal, every 10% otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_BAR = 30
_MIN_REDRAW_S = 0.1


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, success: bool) -> None:
        self.done += 1
        self.failed += 0 if success else 1
        if not self.enabled:
            return
        now = time.perf_counter()
        decile = self.done * 10 // max(self.total, 1)
        if self.tty and (now - self._last_draw >= _MIN_REDRAW_S or self.done == self.total):
            self._last_draw = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()
        elif not self.tty and decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        filled = self.done * _BAR // max(self.total, 1)
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (
            f"[{'#' * filled}{'.' * (_BAR - filled)}] {self.done}/{self.total} "
            f"({self.failed} failed) {elapsed:.1f}s {rate:.2f} req/s"
        )

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
