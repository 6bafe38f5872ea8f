"""Calls to a worker that give up when the worker stops answering: a hung or stopped process
(its load stream to this router goes silent), a stream that sends nothing for too long, or a
channel closed under the call (the worker left the cluster). The orchestrator and the encode
stage make every call to a worker through these."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

from services.router.routing.workers import WorkerHandle

# How often a waiting call checks that its worker's load stream is still alive.
WATCH_INTERVAL_S = 0.25


class WorkerLost(Exception):
    """A worker stopped answering mid-call (``kind`` "hung"): its load stream went silent (a
    hung or stopped process, a partitioned host) or no message came within the stall
    deadline; or ("died") its channel was closed under the call (it left the cluster)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


async def watch(handle: WorkerHandle, task: asyncio.Future, limit_s: float) -> Any:
    """The result of ``task`` (a call to ``handle``), or WorkerLost."""
    started = time.monotonic()
    while True:
        done, _ = await asyncio.wait({task}, timeout=WATCH_INTERVAL_S)
        if done:
            if task.cancelled():
                # We were not cancelled (asyncio.wait would have raised): the call was, by
                # its channel closing under it, when the worker left the cluster.
                raise WorkerLost("died", f"{handle.id} left the cluster during the call")
            return task.result()
        now = time.monotonic()
        if handle.silent(now):
            raise WorkerLost(
                "hung", f"{handle.id} sent no load report for {handle.silence(now):.1f} s"
            )
        if now - started > limit_s:
            raise WorkerLost("hung", f"{handle.id} sent nothing for {limit_s:.0f} s")


async def watched_unary(handle: WorkerHandle, call: Any, limit_s: float) -> Any:
    """Await a unary call to ``handle``; WorkerLost when it stops answering."""
    task = asyncio.ensure_future(call)
    try:
        return await watch(handle, task, limit_s)
    finally:
        if not task.done():
            call.cancel()
            task.cancel()


async def watched_stream(
    handle: WorkerHandle, call: Any, stall_s: float, first_s: float | None = None
) -> AsyncGenerator[Any]:
    """Relay a streaming call to ``handle``; WorkerLost when it stops answering, sends no
    first message within ``first_s`` (default ``stall_s``: a request may rightly wait
    longer in a busy worker's queue, see WorkerHandle.first_message_s), or then nothing
    for ``stall_s``."""
    it = call.__aiter__()
    limit_s = stall_s if first_s is None else first_s
    while True:
        task = asyncio.ensure_future(it.__anext__())
        try:
            msg = await watch(handle, task, limit_s)
        except StopAsyncIteration:
            return
        finally:
            if not task.done():
                task.cancel()
        limit_s = stall_s
        yield msg
