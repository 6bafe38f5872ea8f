"""OpenTelemetry traces of requests, off unless ``--otlp-traces-endpoint`` is given.

One trace per request: the router opens it (``services/router/phases.py``) and carries its
context to the workers in gRPC metadata (W3C ``traceparent``); each worker adds its spans
under the router's call (``services/common/phases.py``). Spans go to an OTLP collector
through a batch processor, over gRPC by default or HTTP/protobuf when
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf`` (vLLM's convention; the other
``OTEL_*`` variables of the exporter apply too).

The OpenTelemetry SDK and exporters are an optional dependency (``pip install
epdserve[tracing]``), imported only when tracing is on. With tracing off every ``Span`` is
``NO_SPAN``, which does nothing, so that callers never test whether tracing is on.

Times are ``time.monotonic()`` seconds, like the rest of the code; they become wall-clock
nanoseconds here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

# Help of the router's and the workers' --otlp-traces-endpoint (vLLM's flag name).
OTLP_TRACES_HELP = (
    "send an OpenTelemetry trace of every request (a span per phase) to this OTLP collector: "
    "http://host:4317 for OTLP/gRPC (plain text; https:// or host:port for TLS), or with "
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf its http://host:4318/v1/traces URL; "
    "empty: no traces (needs epdserve[tracing])"
)
TRACEPARENT = "traceparent"
# Span attribute names (OpenTelemetry's own where one exists).
ATTR_WORKER_ID = "epdserve.worker.id"
ATTR_WORKER_ROLE = "epdserve.worker.role"
ATTR_REQUEST_ID = "epdserve.request.id"
ATTR_MODEL = "gen_ai.request.model"
ATTR_RPC_METHOD = "rpc.method"
ATTR_RPC_STATUS = "rpc.grpc.status_code"


# NOTE: wall clock minus monotonic clock, read once per process. Reading both clocks at each
# conversion put two instants less than a microsecond apart in the wrong order now and then
# (the router's "queue" span ended 20 ns after its "Reserve" call began); one offset keeps
# every span of a process in the order of its monotonic clock.
_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def wall_ns(mono: float) -> int:
    """Wall-clock nanoseconds of a ``time.monotonic()`` instant."""
    return round(mono * 1e9) + _WALL_OFFSET_NS


class Span:
    """One span, or nothing (``NO_SPAN``, and every child of it)."""

    def __init__(self, tracing: Tracing | None = None, otel: Any = None) -> None:
        self._tracing = tracing
        self._otel = otel

    def __bool__(self) -> bool:
        return self._otel is not None

    def child(self, name: str, start: float | None = None, **attributes: Any) -> Span:
        """A span under this one, started at ``start`` (default: now)."""
        if self._tracing is None:
            return NO_SPAN
        return self._tracing.span(name, self._otel, start, **attributes)

    def set(self, key: str, value: Any) -> None:
        if self._otel is not None:
            self._otel.set_attribute(key, value)

    def event(self, name: str, at: float | None = None) -> None:
        if self._otel is not None:
            self._otel.add_event(
                name, timestamp=wall_ns(at if at is not None else time.monotonic())
            )

    def end(self, at: float | None = None, error: str | None = None) -> None:
        """End the span at ``at`` (default: now); ``error`` marks it failed."""
        if self._otel is None:
            return
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            self._otel.set_status(Status(StatusCode.ERROR, error))
        self._otel.end(end_time=wall_ns(at if at is not None else time.monotonic()))
        self._otel = None  # ended once

    def traceparent(self) -> str | None:
        """This span's W3C trace context, for a call whose server adds spans under it."""
        if self._tracing is None or self._otel is None:
            return None
        return self._tracing.traceparent(self._otel)


NO_SPAN = Span()


class Tracing:
    """The tracer of one process (or of one router or worker among several in a test).
    ``endpoint`` "": off. ``service``: the ``service.name`` of its spans."""

    def __init__(self, endpoint: str, service: str, instance: str = "") -> None:
        self.endpoint = endpoint
        self._provider: Any = None
        self._tracer: Any = None
        if not endpoint:
            return
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise RuntimeError(
                "--otlp-traces-endpoint needs the OpenTelemetry SDK and OTLP exporter: "
                "pip install 'epdserve[tracing]' (opentelemetry-sdk, opentelemetry-exporter-otlp)"
            ) from exc
        attrs = {"service.name": service}
        if instance:
            attrs["service.instance.id"] = instance
        # NOTE: a provider of our own, not the global one: several routers and workers can
        # live in one process (tests), each with its own service name and exporter.
        self._provider = TracerProvider(resource=Resource.create(attrs), shutdown_on_exit=False)
        self._provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
        self._tracer = self._provider.get_tracer("epdserve")
        log.info("OpenTelemetry traces go to %s", endpoint)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(
        self, name: str, parent: Any = None, start: float | None = None, **attributes: Any
    ) -> Span:
        """A new span: under ``parent`` (an OpenTelemetry span or Context), else a root."""
        if self._tracer is None:
            return NO_SPAN
        from opentelemetry import trace
        from opentelemetry.context import Context

        context = parent if isinstance(parent, Context) or parent is None else (
            trace.set_span_in_context(parent)
        )  # fmt: skip
        otel = self._tracer.start_span(
            name, context=context, attributes=attributes,
            start_time=wall_ns(start if start is not None else time.monotonic()),
        )  # fmt: skip
        return Span(self, otel)

    def span_from(
        self, metadata: Iterable[tuple[str, Any]] | None, name: str, start: float | None = None,
        **attributes: Any,
    ) -> Span:  # fmt: skip
        """A span under the caller's, whose context came in ``metadata`` (gRPC invocation
        metadata); NO_SPAN when the call carried none (the caller does not trace)."""
        if self._tracer is None:
            return NO_SPAN
        carrier = {str(k): str(v) for k, v in metadata or () if k == TRACEPARENT}
        if not carrier:
            return NO_SPAN
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        context = TraceContextTextMapPropagator().extract(carrier)
        return self.span(name, context, start, **attributes)

    def traceparent(self, otel_span: Any) -> str | None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(otel_span))
        return carrier.get(TRACEPARENT)

    def shutdown(self) -> None:
        """Export what is still queued and stop (bounded by the exporter's timeout)."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = self._tracer = None


def _exporter(endpoint: str) -> Any:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # NOTE: an http:// endpoint is a plain-text connection, https:// or host:port TLS
        # (unless OTEL_EXPORTER_OTLP_TRACES_INSECURE=true): the exporter's own rule.
        return OTLPSpanExporter(endpoint=endpoint)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        return HTTPSpanExporter(endpoint=endpoint)
    raise ValueError(
        f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL {protocol!r}: epdserve exports grpc or http/protobuf"
    )
