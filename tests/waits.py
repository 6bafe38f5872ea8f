"""Waiting in tests for a condition that a background task makes true: polled, bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(pred: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Return once ``pred()`` is true, polled every 50 ms; fail ``timeout`` seconds on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:g} s")
        await asyncio.sleep(0.05)
