"""Which event loop the processes run: uvloop when it is installed, else asyncio's own.

uvloop (libuv, Cython) runs the router's and the worker's per-request work (HTTP, gRPC
callbacks, task switches) in less CPU than asyncio's pure-Python loop; see
benchmarks/RESULTS.md, "gateway overhead". ``EPDSERVE_EVENT_LOOP=asyncio`` turns it off
(e.g. to rule it out while debugging)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from services.common.cpus import pin_from_env
from services.common.sched_slice import set_slice_ns, short_slice, slice_ns

T = TypeVar("T")
log = logging.getLogger(__name__)

ENV = "EPDSERVE_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (asyncio's default) when it is absent or turned off."""
    choice = os.environ.get(ENV, "").strip().lower() or "auto"  # set but empty: the default
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"{ENV} must be auto, uvloop or asyncio, got {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError(f"{ENV}=uvloop but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop (the process pinned to ``EPDSERVE_CPUS``
    first, when that is set: cpus.py), its thread on a short scheduler slice while it runs
    (sched_slice.py: the threads it starts meanwhile keep it)."""
    try:
        pin_from_env()
        factory = loop_factory()
    except ValueError:
        main.close()  # never started: no "never awaited" warning
        raise
    before = slice_ns()
    short_slice()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)
    finally:
        if before is not None:
            set_slice_ns(before)
