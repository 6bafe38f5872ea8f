"""Waiting in tests for a condition that a background task makes true: polled, bounded."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


async def until(pred: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Return once ``pred()`` is true, polled every 50 ms; fail ``timeout`` seconds on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:g} s")
        await asyncio.sleep(0.05)


def sigstop(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it stopped. NOTE: Linux stops a process
    lazily, once the thread the signal picked runs again; meanwhile its other threads go on:
    at a load of 10, a mooncake_master answered an HTTP request sent after the signal (and a
    test then froze in Mooncake's setup against it)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not all(_stopped(task) for task in Path(f"/proc/{pid}/task").glob("*")):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} not stopped in {timeout:g} s")
        time.sleep(0.01)


def _stopped(task: Path) -> bool:
    """Whether the thread ``task`` (/proc/PID/task/TID) is stopped (state T), or gone."""
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return True
