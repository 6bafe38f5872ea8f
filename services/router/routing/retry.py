"""Retrying a request on another worker: how a failed worker call is judged, per attempt."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import grpc

from services.common.grpc_utils import (
    FAILURE_REFUSED,
    FAILURE_REQUEST,
    FAILURE_TRANSFER,
    failure_kind,
)
from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.routing.migration import Migrate
from services.router.routing.poison import PoisonTracker
from services.router.routing.watch import WorkerLost, watched_stream, watched_unary
from services.router.routing.workers import WorkerHandle

log = logging.getLogger(__name__)

# What a mixed worker's failure before the first token must be for another worker to take
# the request: it was unreachable or refused it (nothing was generated yet).
# NOT_FOUND: the worker does not hold the request's LoRA adapter (unloaded meanwhile); another may.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
)
# Prefix of a worker's refusal of a request stamped with an old role epoch (it changed role).
STALE_EPOCH_PREFIX = "stale role epoch"
# What grpc says of a call that could not connect (pick_first; round_robin), also inside the
# details of a shared stream's failure (mux.py): the request never got to the worker.
NOT_CONNECTED = ("failed to connect to all addresses", "connections to all backends failing")


def worker_died(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call means its worker died or crashed its engine while running the
    request (as opposed to refusing it, the request's own failure or a KV transfer). NOTE:
    not a call past its deadline: a worker that hangs (its engine stalled too) is caught by
    its load stream (watch.WorkerLost); one past a call's deadline is slow (a long prompt, a
    deep queue: a PD Prefill call ends 2 s past its reservation's deadline), and two such
    made an honest request poison."""
    kind = failure_kind(exc)
    return exc.code() == grpc.StatusCode.UNAVAILABLE and kind not in (
        FAILURE_REFUSED,
        FAILURE_TRANSFER,
    )


def never_connected(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the call failed to connect: the worker was gone before the request got there
    (two workers killed at once: a request moved off the first one reached the second before
    the router had read that one's load stream break), so its death is not the request's."""
    details = exc.details() or ""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and any(m in details for m in NOT_CONNECTED)


def note_refusal(exc: grpc.aio.AioRpcError, handle: WorkerHandle, epoch: int) -> None:
    """Take a worker out of routing after a refusal that says our view of it is stale."""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        handle.mark_failed()
    elif exc.code() == grpc.StatusCode.FAILED_PRECONDITION and (exc.details() or "").startswith(
        STALE_EPOCH_PREFIX
    ):
        handle.mark_stale_epoch(epoch)


def api_error_from_grpc(exc: grpc.aio.AioRpcError) -> APIError:
    code, detail = exc.code(), exc.details() or ""
    if failure_kind(exc) == FAILURE_REQUEST:
        return APIError(
            500, f"{detail}; the request was not retried on another worker",
            code="request_failed",
        )  # fmt: skip
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return APIError(400, detail)
    if code == grpc.StatusCode.NOT_FOUND:  # the worker does not hold the request's adapter
        return APIError(404, detail, param="model", code="model_not_found")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, "generation timed out on the worker")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return APIError(503, f"worker unavailable: {detail}")
    return APIError(500, f"worker error ({code.name}): {detail}")


class AttemptFailed(Exception):
    """One attempt of a request failed before its first token: another worker may take it.
    ``kind``: the failure kind the worker sent (None: it died, hung or left, or said none)."""

    def __init__(self, kind: str | None = None) -> None:
        super().__init__(kind or "attempt failed")
        self.kind = kind


class WorkerBusy(Exception):
    """The worker has no room for the request now (RESOURCE_EXHAUSTED): backpressure, nothing
    failed; ask again later, or another worker."""


class Attempts:
    """One request's attempts on workers and the judgement of their failures, the same on
    every path. The request's own fault (a bad argument, failure kind "request") is the
    client's error at once: never retried. Any other failure before the first token (on
    the mixed path only the ``retry`` status codes) takes the worker out for this request
    and lets another try (``AttemptFailed``); after it, the request migrates (``Migrate``)
    unless the failure is the request's or its deadline. A worker that died or hung while
    running the request counts towards making it poison (poison.py), which stops it."""

    def __init__(
        self, poison: PoisonTracker, retry: frozenset[grpc.StatusCode] | None = None
    ) -> None:
        self.poison = poison
        self.retry = retry  # None: every failure that is not the request's own
        # Worker processes (WorkerHandle.process) this request does not go to again; the
        # same worker restarted is a new process, which it may try.
        self.tried: set[str] = set()
        # Of those, the processes that died or hung on this request. NOTE: a process that
        # died never reports again (a restart is a new process), so one of these reporting
        # again stalled and recovered on its own: it may be tried again rather than waited
        # for as a restart that will never come (worker_choice._usable).
        self.down: set[str] = set()
        # Workers tried only when no other is usable (the decode side of a failed KV transfer).
        self.suspects: set[str] = set()
        self.last_error: APIError | None = None  # the client's error when no attempt is left

    def lost(self, handle: WorkerHandle, exc: WorkerLost) -> AttemptFailed:
        """``handle`` stopped answering mid-call: out of routing, and a death of the request's."""
        log.warning("worker %s stopped answering: %s", handle.id, exc)
        handle.mark_failed()
        self.tried.add(handle.process)
        self.down.add(handle.process)
        self.last_error = APIError(503, f"worker unavailable: {exc}")
        self._death(handle)
        return AttemptFailed()

    def _death(self, handle: WorkerHandle, exc: grpc.aio.AioRpcError | None = None) -> None:
        """``handle`` died or hung running the request (``exc``: its failed call): a death of
        the request's (poison.py) unless the call never got to it (``never_connected``)."""
        if exc is not None and never_connected(exc):
            log.info("%s was gone before the request got there: not its death", handle.id)
            return
        self.poison.note_current_death(handle.process, handle.alive_at)

    def failed(self, exc: grpc.aio.AioRpcError, handle: WorkerHandle, epoch: int) -> AttemptFailed:
        """A call to ``handle`` (stamped with role ``epoch``) failed before the first token:
        raises the client's error if no other worker may take the request; else the worker
        is out for this request (and out of routing if unreachable, hung, mid-flip or past
        ``epoch``)."""
        code, kind = exc.code(), failure_kind(exc)
        if (
            code == grpc.StatusCode.INVALID_ARGUMENT
            or kind == FAILURE_REQUEST
            or (self.retry is not None and code not in self.retry)
        ):
            raise api_error_from_grpc(exc) from None
        log.warning("call to %s failed: %s %s; trying another worker", handle.id, code.name,
                    exc.details())  # fmt: skip
        self.tried.add(handle.process)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            handle.mark_failed()
        note_refusal(exc, handle, epoch)
        self.last_error = api_error_from_grpc(exc)
        if worker_died(exc):
            self.down.add(handle.process)
            self._death(handle, exc)
        return AttemptFailed(kind)

    def mid_stream(self, exc: grpc.aio.AioRpcError, handle: WorkerHandle, epoch: int) -> Exception:
        """After tokens were streamed: a dead worker (or one that gave the request up: engine
        failure, role change) means migration; the request's own fault or its deadline is
        the client's error."""
        if (
            exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED)
            or failure_kind(exc) == FAILURE_REQUEST
        ):
            return api_error_from_grpc(exc)
        note_refusal(exc, handle, epoch)
        if worker_died(exc):
            self._death(handle, exc)
        return Migrate("died", f"{handle.id}: {exc.code().name} {exc.details()}")

    async def unary(
        self,
        handle: WorkerHandle,
        call: Any,
        limit_s: float,
        epoch: int,
        busy_until: float | None = None,
    ) -> Any:
        """The reply of a unary ``call`` to ``handle``, or ``AttemptFailed``. A refusal for lack
        of room before the monotonic time ``busy_until`` raises ``WorkerBusy`` instead."""
        self.poison.note_current_placement(handle.process)
        try:
            return await watched_unary(handle, call, limit_s)
        except WorkerLost as exc:
            raise self.lost(handle, exc) from None
        except grpc.aio.AioRpcError as exc:
            if (
                busy_until is not None
                and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                and time.monotonic() <= busy_until
            ):
                raise WorkerBusy(exc.details()) from None
            raise self.failed(exc, handle, epoch) from None

    async def relay(
        self,
        handle: WorkerHandle,
        call: Any,
        stall_s: float,
        first_s: float,
        epoch: int,
        on_first: Callable[[pb.GenerateResponse], None],
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The messages of a streaming ``call`` to ``handle`` (see watch.watched_stream for
        ``stall_s`` and ``first_s``); ``on_first`` sees the first one before it is relayed.
        A failure raises ``AttemptFailed`` before the first message, ``Migrate`` or the
        client's error after it. The relay ends with the request's ``finished`` message: the
        call's status is not waited for (measured: 0.17 ms a request, p50; nothing follows
        that message), and the call ends on its own. NOTE: it holds nothing to clean up; the
        caller cancels ``call`` unless it saw that message (a cancel then would cut the
        worker's end of a finished request short)."""
        self.poison.note_current_placement(handle.process)
        got_any = False
        try:
            async with aclosing(watched_stream(handle, call, stall_s, first_s)) as stream:
                async for resp in stream:
                    if not got_any:
                        on_first(resp)
                        got_any = True
                    yield resp
                    if resp.finished:
                        return
        except WorkerLost as exc:
            failure = self.lost(handle, exc)
            if got_any:
                raise Migrate(exc.kind, str(exc)) from None
            raise failure from None
        except grpc.aio.AioRpcError as exc:
            if got_any:
                raise self.mid_stream(exc, handle, epoch) from None
            raise self.failed(exc, handle, epoch) from None
