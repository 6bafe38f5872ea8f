"""Recent per-request latency figures (TTFT, TPOT) that a worker reports to routers."""

from __future__ import annotations

import time
from collections import deque


class LatencyWindow:
    """Mean of the samples of the last ``window_s`` seconds (at most ``maxlen`` kept)."""

    def __init__(self, window_s: float = 30.0, maxlen: int = 256) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=maxlen)

    def add(self, value: float, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, value))

    def mean(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        recent = [v for t, v in self._samples if now - t <= self.window_s]
        return sum(recent) / len(recent) if recent else 0.0
