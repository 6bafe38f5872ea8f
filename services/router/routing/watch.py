"""Calls to a worker that give up when the worker stops answering: a hung or stopped process
(its load stream to this router goes silent), a stream that sends nothing for too long, or a
channel closed under the call (the worker left the cluster). The orchestrator and the encode
stage make every call to a worker through these.

One watchdog per call: a timer that, every ``WATCH_INTERVAL_S`` while the caller waits for
the call, checks the worker's load stream and the wait's deadline, and cancels the waiting
task when either is past (the way ``asyncio.timeout`` does). A message costs two attribute
writes, where a Task and an ``asyncio.wait`` per message cost 4x a plain read in CPU."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from services.router.routing.workers import WorkerHandle

T = TypeVar("T")

# How often a waiting call checks that its worker's load stream is still alive.
WATCH_INTERVAL_S = 0.25


class WorkerLost(Exception):
    """A worker stopped answering mid-call (``kind`` "hung"): its load stream went silent (a
    hung or stopped process, a partitioned host) or no message came within the stall
    deadline; or ("died") its channel was closed under the call (it left the cluster)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class Watchdog:
    """Watches the waits of one call to ``handle``; ``close()`` it when the call is over.

    NOTE: it watches only while ``wait`` awaits: a stream's consumer may hold a message as
    long as it likes (a slow client) and its own awaits in the same task are never
    cancelled by us. A cancel of the waiting task is ours when ``lost`` is set; one that
    nobody asked for (``Task.cancelling()`` unchanged) is grpc.aio's, raised when the
    channel is closed under the call."""

    def __init__(self, handle: WorkerHandle) -> None:
        self.handle = handle
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None  # the task waiting now, if any
        self._deadline = 0.0  # monotonic time the current wait gives up
        self._limit_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._lost: WorkerLost | None = None  # set when the watchdog cancelled a wait
        self._due = 0.0  # monotonic time the next check is due (it may run later)

    async def wait(self, step: Awaitable[T], limit_s: float) -> T:
        """The result of ``step`` (a call to the worker, or its next message), or WorkerLost
        when the worker goes silent or ``step`` takes over ``limit_s``."""
        task = asyncio.current_task()
        assert task is not None, "a watched call must run in a task"
        cancels = task.cancelling()
        self._task, self._limit_s = task, limit_s
        self._deadline = time.monotonic() + limit_s
        if self._timer is None:
            self._arm()
        try:
            return await step
        except asyncio.CancelledError:
            lost, self._lost = self._lost, None
            if lost is not None:
                if task.uncancel() > cancels:
                    raise  # cancelled from outside as well: that wins
                raise lost from None
            if task.cancelling() > cancels:
                raise  # the caller was cancelled (client gone, consumer closed)
            # Nobody cancelled us: grpc.aio cancelled the call, its channel closing under
            # it when the worker left the cluster.
            raise WorkerLost("died", f"{self.handle.id} left the cluster during the call") from None
        finally:
            self._task = None

    def _arm(self) -> None:
        self._due = time.monotonic() + WATCH_INTERVAL_S
        self._timer = self._loop.call_later(WATCH_INTERVAL_S, self._check)

    def _check(self) -> None:
        self._timer = None
        task = self._task
        if task is None:
            return  # nobody waits: the next wait starts the timer again
        # NOTE: judged as of when this check was due, not when it ran: a router stopped
        # (SIGSTOP) or starved for seconds heard nothing from anyone meanwhile, while its
        # workers' reports of that time wait unread in its sockets. Judged at its resume,
        # every worker looked silent and every stream was moved (chaos11, session 18); the
        # next check, one interval on, sees the reports read by then. A loop that is only
        # late shifts each judgement by its lateness, never by more than one check's.
        now = self._due
        if self.handle.silent(now):
            silence = self.handle.silence(now)
            self._lost = WorkerLost(
                "hung", f"{self.handle.id} sent no load report for {silence:.1f} s"
            )
        elif now > self._deadline:
            # NOTE: a worker that sent a message on another call within the limit steps its
            # engine: this call waits its turn in the queue (behind max_num_seqs sequences of
            # long outputs, one request's n x prompts or many requests'), it is not lost.
            # Branding it hung failed every queued stream at once and the worker with them.
            # Its deadline follows the worker's progress; the call's own timeout still bounds it.
            # Progress is a message on any call, or a load report saying its engine moved: on
            # a loaded host one step (a wave's prompts) can outlast the limit with no message
            # anywhere while every layer moves (session 18: 503s at load 30-50).
            moved = max(self.handle.message_at, self.handle.progress_at) + self._limit_s
            if moved > now:
                self._deadline = moved
            else:
                self._lost = WorkerLost(
                    "hung", f"{self.handle.id} sent nothing for {self._limit_s:.0f} s"
                )
        if self._lost is not None:
            task.cancel()
            return
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def watched_unary(handle: WorkerHandle, call: Any, limit_s: float) -> Any:
    """Await a unary call to ``handle``; WorkerLost when it stops answering."""
    dog = Watchdog(handle)
    try:
        return await dog.wait(call, limit_s)
    except (WorkerLost, asyncio.CancelledError):
        call.cancel()  # no-op when it already ended
        raise
    finally:
        dog.close()


async def watched_stream(
    handle: WorkerHandle, call: Any, stall_s: float, first_s: float | None = None
) -> AsyncGenerator[Any]:
    """Relay a streaming call to ``handle``; WorkerLost when it stops answering, sends no
    first message within ``first_s`` (default ``stall_s``: a request may rightly wait
    longer in a busy worker's queue, see WorkerHandle.first_message_s), or then nothing
    for ``stall_s``."""
    it = call.__aiter__()
    limit_s = stall_s if first_s is None else first_s
    dog = Watchdog(handle)
    try:
        while True:
            try:
                msg = await dog.wait(it.__anext__(), limit_s)
            except StopAsyncIteration:
                return
            limit_s = stall_s
            handle.message_at = time.monotonic()
            yield msg
    finally:
        dog.close()
