"""When requests are sent: gamma-distributed gaps and a concurrency cap.

The gap after each request is drawn from Gamma(shape=burstiness, scale=1/(rate*burstiness)):
its mean is 1/rate for any burstiness, and its coefficient of variation is 1/sqrt(burstiness)
(1 = Poisson arrivals, < 1 burstier, > 1 more regular). ``rate = inf`` gives zero gaps.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


def gamma_gaps(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """``n`` gaps in seconds; gap ``i`` is the wait after sending request ``i``."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)
    return rng.gamma(shape=burstiness, scale=theta, size=n).tolist()


async def dispatch(
    items: Sequence[T],
    gaps: Sequence[float],
    send: Callable[[T], Awaitable[R]],
    max_concurrency: int | None = None,
) -> list[R]:
    """Send ``items`` in order, waiting ``gaps[i]`` after item ``i``; results in item order.

    NOTE: with a cap, the sender waits for a free slot *before* drawing on the schedule, and
    each gap is measured from the moment the previous request actually left. A request held
    back by the cap therefore delays all later ones: there is no burst to "catch up" with an
    arrival schedule fixed in advance (which is what a semaphore taken inside each
    pre-scheduled task would do).
    """
    if len(gaps) < len(items):
        raise ValueError(f"{len(items)} items but only {len(gaps)} gaps")
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def run(item: T) -> R:
        try:
            return await send(item)
        finally:
            if slots is not None:
                slots.release()

    tasks: list[asyncio.Task[R]] = []
    try:
        for i, item in enumerate(items):
            if slots is not None:
                await slots.acquire()
            tasks.append(asyncio.create_task(run(item)))
            if i + 1 < len(items) and gaps[i] > 0:
                await asyncio.sleep(gaps[i])
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:  # only on cancellation/error: gather already finished them otherwise
            t.cancel()
