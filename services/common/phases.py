"""Where a request's time goes on a worker: phase histograms and the worker's spans.

``PhaseInterceptor`` wraps the request calls of the WorkerService and times them:

- ``Reserve`` (decode role): phase ``reserve``, finding and holding the KV blocks.
- ``Prefill`` (prefill role): phase ``prefill`` from the call's arrival until the engine has
  sampled the first token (queue, images, compute: ``prefill_computed()`` marks the end), and
  ``kv_transfer`` from then until the push into the decode worker is confirmed (the part of
  the transfer the prefill did not hide).
- ``Decode`` (decode role): phase ``decode_queue``, from the call's arrival to its first
  output (KV copied in from staging, a place in the batch, the first step).
- ``Encode`` (encode role): phase ``encode``.
- ``Generate`` (mixed role): a span only; its TTFT is ``epdserve:time_to_first_token_seconds``.
  A request on a GenerateMux stream (worker/mux.py) gets the same span.

With tracing on, each call is a span under the router's (its ``traceparent`` metadata), with a
child span per phase, all with the worker's id and role as attributes.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from services.common.tracing import (
    ATTR_REQUEST_ID,
    ATTR_RPC_METHOD,
    ATTR_WORKER_ID,
    ATTR_WORKER_ROLE,
    Span,
    Tracing,
)

# The calls that belong to a request.
TRACED = ("Reserve", "Prefill", "Decode", "Encode", "Generate")

# The Prefill call the current task serves, for ``prefill_computed``.
_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("worker_call", default=None)
# The interceptor of the GenerateMux stream the current task serves: worker/mux.py times
# each request on it as a Generate or Decode call (``mux_request_span``).
_MUX: contextvars.ContextVar[PhaseInterceptor | None] = contextvars.ContextVar(
    "worker_mux", default=None
)


class MuxTimer:
    """The timing of one request on a GenerateMux stream, as its call of its own has it."""

    def __init__(self, interceptor: PhaseInterceptor, call: _Call) -> None:
        self._interceptor = interceptor
        self._call = call

    def first_message(self) -> None:
        self._interceptor._first(self._call, time.monotonic())

    def end(self, error: str | None) -> None:
        self._call.span.end(error=error)


def mux_request_span(traceparent: str, request: Any, decode: bool = False) -> MuxTimer | None:
    """The span of one Generate (``decode``: Decode) request on a GenerateMux stream (under
    the router's call, ``traceparent``), as a call of its own has; None where the worker
    does not time its calls. The caller ends it."""
    interceptor = _MUX.get()
    if interceptor is None:
        return None
    metadata = (("traceparent", traceparent),) if traceparent else ()
    return MuxTimer(
        interceptor, interceptor._begin("Decode" if decode else "Generate", metadata, request)
    )


def prefill_computed() -> None:
    """The current Prefill call's first token is sampled: its compute ends, its KV push's
    tail begins. A no-op outside a timed call."""
    call = _CALL.get()
    if call is not None and call.computed_at is None:
        call.computed_at = time.monotonic()


class _Call:
    """One timed call on this worker."""

    def __init__(self, method: str, started: float, span: Span) -> None:
        self.method = method
        self.started = started
        self.span = span
        self.computed_at: float | None = None  # Prefill: first token sampled


class PhaseInterceptor(grpc.aio.ServerInterceptor):
    """``metrics``: the worker's WorkerMetrics (``observe_phase``); ``state``: its WorkerState
    (id, current role); ``tracing``: its tracer."""

    def __init__(self, metrics: Any, state: Any, tracing: Tracing) -> None:
        self.metrics = metrics
        self.state = state
        self.tracing = tracing

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if method == "GenerateMux" and handler is not None and handler.stream_stream is not None:
            return handler._replace(stream_stream=self._mux(handler.stream_stream))
        if handler is None or method not in TRACED:
            return handler
        metadata = handler_call_details.invocation_metadata
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, metadata, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(
                unary_stream=self._stream(method, metadata, handler.unary_stream)
            )
        return handler

    def _begin(self, method: str, metadata: Any, request: Any) -> _Call:
        now = time.monotonic()
        span = self.tracing.span_from(
            metadata, method, start=now,
            **{ATTR_RPC_METHOD: method, ATTR_WORKER_ID: str(self.state.instance_id),
               ATTR_WORKER_ROLE: str(self.state.role),
               ATTR_REQUEST_ID: str(getattr(request, "request_id", ""))},
        )  # fmt: skip
        call = _Call(method, now, span)
        _CALL.set(call)
        return call

    def _phase(self, call: _Call, phase: str, start: float, end: float) -> None:
        self.metrics.observe_phase(phase, end - start)
        call.span.child(phase, start=start).end(at=end)

    def _first(self, call: _Call, now: float) -> None:
        """A streamed call's first message: a Decode's wait for its batch ends there."""
        if call.method == "Decode":
            self._phase(call, "decode_queue", call.started, now)
        else:
            call.span.event("first_token", at=now)

    def _unary(self, method: str, metadata: Any, behavior: Callable[..., Any]) -> Any:
        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = self._begin(method, metadata, request)
            error: str | None = "failed"
            try:
                response = await behavior(request, context)
                error = None
                return response
            finally:
                ended = time.monotonic()
                if error is None:
                    if method == "Reserve":
                        self._phase(call, "reserve", call.started, ended)
                    elif method == "Encode":
                        self._phase(call, "encode", call.started, ended)
                    elif method == "Prefill" and call.computed_at is not None:
                        self._phase(call, "prefill", call.started, call.computed_at)
                        self._phase(call, "kv_transfer", call.computed_at, ended)
                call.span.end(at=ended, error=error)

        return timed

    def _mux(self, behavior: Callable[..., Any]) -> Any:
        async def traced(frames: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            # NOTE: the stream's request tasks are created under this context: they see it.
            _MUX.set(self)
            async with contextlib.aclosing(behavior(frames, context)) as out:
                async for batch in out:
                    yield batch

        return traced

    def _stream(self, method: str, metadata: Any, behavior: Callable[..., Any]) -> Any:
        async def timed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = self._begin(method, metadata, request)
            first = True
            error: str | None = "cancelled"
            try:
                # NOTE: closing this generator (the client went away) closes the servicer's
                # at once, so that its cleanup (abort, free the KV) runs now, not at GC.
                async with contextlib.aclosing(behavior(request, context)) as outputs:
                    async for msg in outputs:
                        if first:
                            first = False
                            self._first(call, time.monotonic())
                        yield msg
                error = None
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                call.span.end(error=error)

        return timed
