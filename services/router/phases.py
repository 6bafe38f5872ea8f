"""Where a request's time goes, as the router sees it: phase histograms and the request's trace.

A request's phases on the router are its queue (from its arrival at the HTTP endpoint to
its first call to a worker: body parsing, chat template, tokenization, admission, routing;
admission refuses rather than queues, see admission.py) and its calls to workers: Encode,
Reserve, Prefill (histograms ``epdserve:router_request_phase_seconds``), Decode and
Generate (spans only: their first output is the workers' ``decode_queue`` and TTFT).

``RouterPhases.begin`` starts a request's ``RequestTrace`` (the orchestrator, once per
request) and makes it the current one of the task (a context variable, like the request's
worker deaths in poison.py); ``TracedStub``, the stub of every channel to a worker, times
each call of the current request and carries the trace's context to the worker in the
call's metadata (W3C ``traceparent``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from services.common.tracing import (
    ATTR_MODEL,
    ATTR_REQUEST_ID,
    ATTR_RPC_METHOD,
    ATTR_RPC_STATUS,
    ATTR_WORKER_ID,
    ATTR_WORKER_ROLE,
    TRACEPARENT,
    Span,
    Tracing,
)

if TYPE_CHECKING:
    from services.router.metrics import RouterMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# The worker calls that are phases of a request (histogram name) or spans only (None).
PHASE_OF_METHOD: dict[str, str | None] = {
    "Encode": "encode", "Reserve": "reserve", "Prefill": "prefill",
    "Decode": None, "Generate": None, "Release": None,
}  # fmt: skip

# time.monotonic() of the current HTTP request's arrival (set by the API endpoint wrapper).
_ARRIVED: contextvars.ContextVar[float | None] = contextvars.ContextVar("arrived", default=None)
# The request the current task runs (set by RouterPhases.begin).
_CURRENT: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
    "request_trace", default=None
)


def mark_arrival() -> None:
    """The current task's HTTP request arrived now: its queue phase starts here."""
    _ARRIVED.set(time.monotonic())


class RouterPhases:
    """The phase histograms and the tracer of one router."""

    def __init__(self, metrics: RouterMetrics | None = None, tracing: Tracing | None = None):
        self.metrics = metrics
        self.tracing = tracing or Tracing("", "epdserve-router")

    def begin(self, request_id: str, model: str) -> RequestTrace:
        """Start timing one request (its queue from its arrival, if the endpoint marked it)."""
        trace = RequestTrace(self, request_id, model, _ARRIVED.get() or time.monotonic())
        trace.resume()
        return trace


class RequestTrace:
    """One request's trace: a root span, its queue, a span per worker call."""

    def __init__(self, phases: RouterPhases, request_id: str, model: str, arrived: float):
        self.phases = phases
        self.model = model
        self.arrived = arrived
        self.queued = True  # until the first call to a worker
        self.root: Span = phases.tracing.span(
            "request", start=arrived, **{ATTR_REQUEST_ID: request_id, ATTR_MODEL: model}
        )

    def resume(self) -> None:
        """The current task runs this request: its worker calls are traced (a stream's steps
        run in more than one task)."""
        _CURRENT.set(self)

    def call(self, method: str, worker_id: str, role: str) -> WorkerCall:
        """A call to a worker starts now."""
        now = time.monotonic()
        if self.queued:
            self.queued = False
            self._observe("queue", now - self.arrived)
            self.root.child("queue", start=self.arrived).end(at=now)
        span = self.root.child(
            method, start=now,
            **{ATTR_RPC_METHOD: method, ATTR_WORKER_ID: worker_id, ATTR_WORKER_ROLE: role},
        )  # fmt: skip
        return WorkerCall(self, PHASE_OF_METHOD.get(method), span, now)

    def _observe(self, phase: str, seconds: float) -> None:
        if self.phases.metrics is not None:
            self.phases.metrics.observe_phase(self.model, phase, seconds)

    async def end_if_raises(self, step: Awaitable[T]) -> T:
        """Await a step of the request; the trace ends with its error if it raises."""
        try:
            return await step
        except BaseException as exc:
            self.end(exc)
            raise

    def end(self, exc: BaseException | None = None) -> None:
        """The request is over: its response ended (``exc`` None), failed or was abandoned."""
        error = None
        if isinstance(exc, GeneratorExit | asyncio.CancelledError):
            error = "cancelled"
        elif exc is not None:
            error = f"{type(exc).__name__}: {exc}"
        self.root.end(error=error)


class WorkerCall:
    """One call of a request to a worker: a span, and a phase histogram when it is one."""

    def __init__(self, trace: RequestTrace, phase: str | None, span: Span, started: float):
        self.trace = trace
        self.phase = phase
        self.span = span
        self.started = started

    def done(self, code: grpc.StatusCode) -> None:
        ended = time.monotonic()
        if code == grpc.StatusCode.OK and self.phase is not None:
            self.trace._observe(self.phase, ended - self.started)
        self.span.set(ATTR_RPC_STATUS, code.value[0])
        self.span.end(at=ended, error=None if code == grpc.StatusCode.OK else code.name)


class TracedStub:
    """The stub of the channel to one worker (``handle``: its WorkerHandle, read at call time
    for the worker's id and current role): the calls of the current request are timed and
    carry the request's trace context in their metadata. Calls outside a request (load
    streams, health, admin) go to the plain stub untouched.

    NOTE: not grpc.aio client interceptors: a channel with any runs every call's start in a
    Task of its own and every streamed message through a wrapping async generator, for all
    calls alike. The call itself goes back to the caller untouched (its cancel, its errors
    and their trailing metadata are the orchestrator's); its status is read once it is done,
    and only where something records it (a phase histogram or a recording span)."""

    def __init__(self, stub: Any, handle: Any) -> None:
        self._stub = stub
        self.handle = handle
        self._finishing: set[asyncio.Task[None]] = set()

    def __getattr__(self, method: str) -> Any:
        plain = getattr(self._stub, method)
        if method not in PHASE_OF_METHOD:
            return plain

        def start(request: Any, *, metadata: Any = None, **kwargs: Any) -> Any:
            trace = _CURRENT.get()
            if trace is None:
                return plain(request, metadata=metadata, **kwargs)
            worker_call = trace.call(method, self.handle.id, self.handle.info.role)
            traceparent = worker_call.span.traceparent()
            if traceparent is not None:
                metadata = (*(metadata or ()), (TRACEPARENT, traceparent))
            call = plain(request, metadata=metadata, **kwargs)
            if worker_call.phase is not None or worker_call.span:
                call.add_done_callback(lambda c: self._finish(call, worker_call))
            return call

        return start

    def _finish(self, call: Any, worker_call: WorkerCall) -> None:
        async def status() -> None:
            try:
                code = grpc.StatusCode.CANCELLED if call.cancelled() else await call.code()
            except Exception:  # noqa: BLE001 - the call's outcome is the caller's business
                code = grpc.StatusCode.UNKNOWN
            worker_call.done(code)

        task = asyncio.get_running_loop().create_task(status())
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
