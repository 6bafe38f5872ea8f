"""An in-process OTLP/gRPC trace collector for tests: it keeps every span it is sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc


@dataclass
class SpanRecord:
    service: str  # the exporting process's service.name
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    error: bool = False


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class OTLPCollector(ts_grpc.TraceServiceServicer):
    """``endpoint``: what ``--otlp-traces-endpoint`` takes (plain-text gRPC on 127.0.0.1)."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        ts_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"

    def __enter__(self) -> OTLPCollector:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)

    def Export(self, request: ts.ExportTraceServiceRequest, context: Any) -> Any:  # noqa: N802
        got = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for scope in rs.scope_spans:
                for s in scope.spans:
                    got.append(SpanRecord(
                        str(resource.get("service.name", "")), s.trace_id.hex(), s.span_id.hex(),
                        s.parent_span_id.hex(), s.name, s.start_time_unix_nano,
                        s.end_time_unix_nano, {a.key: _value(a.value) for a in s.attributes},
                        s.status.code == 2,  # STATUS_CODE_ERROR
                    ))  # fmt: skip
        with self._lock:
            self.spans += got
        return ts.ExportTraceServiceResponse()

    def traces(self) -> dict[str, list[SpanRecord]]:
        """trace id -> its spans."""
        with self._lock:
            spans = list(self.spans)
        out: dict[str, list[SpanRecord]] = {}
        for s in spans:
            out.setdefault(s.trace_id, []).append(s)
        return out

    def wait_for(
        self, done: Callable[[dict[str, list[SpanRecord]]], bool], timeout: float = 20.0
    ) -> dict[str, list[SpanRecord]]:
        """The traces once ``done(traces)`` holds (or at the timeout, for the assertion)."""
        deadline = time.monotonic() + timeout
        while True:
            traces = self.traces()
            if done(traces) or time.monotonic() > deadline:
                return traces
            time.sleep(0.1)
