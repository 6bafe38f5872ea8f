"""Arrival process: gamma gaps (mean 1/rate, CV 1/sqrt(burstiness)) and the concurrency cap."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from services.bench.arrivals import dispatch, gamma_gaps


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_mean_and_spread(rate: float, burstiness: float) -> None:
    gaps = np.array(gamma_gaps(40_000, rate, burstiness, np.random.default_rng(7)))
    assert gaps.min() >= 0.0
    assert gaps.mean() == pytest.approx(1.0 / rate, rel=0.03)
    # Gamma(k, theta): CV = 1/sqrt(k): burstiness < 1 is burstier than Poisson (CV 1).
    assert gaps.std() / gaps.mean() == pytest.approx(1.0 / math.sqrt(burstiness), rel=0.05)


def test_poisson_gaps_are_exponential() -> None:
    gaps = np.array(gamma_gaps(40_000, 2.0, 1.0, np.random.default_rng(1)))
    # P(gap > t) = exp(-rate t) for a Poisson process.
    for t in (0.25, 0.5, 1.0):
        assert (gaps > t).mean() == pytest.approx(math.exp(-2.0 * t), abs=0.01)


def test_gamma_gaps_edge_cases() -> None:
    assert gamma_gaps(5, math.inf, 1.0, np.random.default_rng(0)) == [0.0] * 5
    assert gamma_gaps(0, 3.0, 1.0, np.random.default_rng(0)) == []
    a = gamma_gaps(10, 3.0, 0.5, np.random.default_rng([42, 2]))
    assert a == gamma_gaps(10, 3.0, 0.5, np.random.default_rng([42, 2]))
    assert a != gamma_gaps(10, 3.0, 0.5, np.random.default_rng([43, 2]))


class Recorder:
    """A fake request: records when it started and how many ran at once."""

    def __init__(self, durations: list[float]) -> None:
        self.durations = durations
        self.starts: dict[int, float] = {}
        self.inflight = 0
        self.peak = 0
        self.t0 = time.perf_counter()

    async def send(self, i: int) -> int:
        self.starts[i] = time.perf_counter() - self.t0
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await asyncio.sleep(self.durations[i])
        finally:
            self.inflight -= 1
        return i * 10


def test_cap_limits_inflight_and_keeps_order() -> None:
    rec = Recorder([0.05, 0.01, 0.03, 0.02] * 5)
    out = asyncio.run(dispatch(list(range(20)), [0.0] * 20, rec.send, max_concurrency=3))
    assert out == [i * 10 for i in range(20)]
    assert rec.peak == 3


def test_no_cap_sends_everything_at_once_with_zero_gaps() -> None:
    rec = Recorder([0.1] * 12)
    asyncio.run(dispatch(list(range(12)), [0.0] * 12, rec.send))
    assert rec.peak == 12
    assert max(rec.starts.values()) < 0.05


def test_gaps_are_waited_between_sends() -> None:
    gaps = [0.03, 0.06, 0.0, 0.04, 0.0]
    rec = Recorder([0.001] * 5)
    asyncio.run(dispatch(list(range(5)), gaps, rec.send))
    s = [rec.starts[i] for i in range(5)]
    for i in range(4):
        assert s[i + 1] - s[i] >= gaps[i] - 0.002


def test_cap_does_not_catch_up_after_being_blocked() -> None:
    # Request 0 holds the only slot for 0.3 s; the others are short, 0.05 s apart. A
    # pre-scheduled sender would fire 1..5 back to back at 0.3 s to catch up with its
    # timetable; ours keeps the 0.05 s gaps after the block.
    gap = 0.05
    rec = Recorder([0.3] + [0.001] * 5)
    asyncio.run(dispatch(list(range(6)), [gap] * 6, rec.send, max_concurrency=1))
    s = [rec.starts[i] for i in range(6)]
    assert s[1] >= 0.3 - 0.01
    for i in range(1, 5):
        assert s[i + 1] - s[i] >= gap - 0.005, s


def test_dispatch_rejects_short_gaps() -> None:
    async def send(i: int) -> int:
        return i

    with pytest.raises(ValueError, match="gaps"):
        asyncio.run(dispatch([1, 2, 3], [0.0], send))
