"""services/common/tracing.py: spans over OTLP/HTTP (protobuf) to an in-process receiver, the
W3C context carried from one process's span to another's, and tracing off doing nothing."""

from __future__ import annotations

import time

import pytest

from services.common.tracing import NO_SPAN, TRACEPARENT, Tracing
from tests.deps import OTEL, require
from tests.local_http import QuietHandler, base_url, local_http

require("opentelemetry.sdk", OTEL)
pytestmark = [pytest.mark.timeout(60)]


class _Receiver(QuietHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers["Content-Length"])
        type(self).bodies.append(self.rfile.read(n))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()


@pytest.fixture
def http_collector():
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts

    _Receiver.bodies = []

    def spans() -> list:
        out = []
        for body in list(_Receiver.bodies):
            req = ts.ExportTraceServiceRequest.FromString(body)
            for rs in req.resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes
                               if a.key == "service.name")  # fmt: skip
                out += [(service, s) for ss in rs.scope_spans for s in ss.spans]
        return out

    with local_http(_Receiver) as server:
        yield base_url(server) + "/v1/traces", spans


def test_spans_over_otlp_http_and_context_across_processes(http_collector, monkeypatch) -> None:
    url, spans = http_collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    router, worker = Tracing(url, "router"), Tracing(url, "worker", "w7")
    start = time.monotonic()
    root = router.span("request", start=start, **{"epdserve.request.id": "r1"})
    call = root.child("Prefill", **{"epdserve.worker.id": "w7"})
    traceparent = call.traceparent()
    assert traceparent is not None and traceparent.startswith("00-")
    # The worker sees only the call's metadata.
    served = worker.span_from([("other", "x"), (TRACEPARENT, traceparent)], "Prefill")
    served.child("prefill", start=start + 0.001).end(at=start + 0.002)
    served.end(error="failed")
    call.end()
    root.end()
    root.end()  # a second end is a no-op
    assert worker.span_from([("other", "x")], "Prefill") is NO_SPAN  # no context: no span
    router.shutdown()
    worker.shutdown()

    got = {s.name + "@" + service: s for service, s in spans()}
    assert set(got) == {"request@router", "Prefill@router", "Prefill@worker", "prefill@worker"}
    trace_ids = {s.trace_id for s in got.values()}
    assert len(trace_ids) == 1
    assert got["Prefill@router"].parent_span_id == got["request@router"].span_id
    assert got["Prefill@worker"].parent_span_id == got["Prefill@router"].span_id
    assert got["prefill@worker"].parent_span_id == got["Prefill@worker"].span_id
    assert got["Prefill@worker"].status.code == 2  # error
    p = got["prefill@worker"]
    assert p.end_time_unix_nano - p.start_time_unix_nano == pytest.approx(1e6, rel=0.05)


def test_tracing_off_is_no_span() -> None:
    off = Tracing("", "router")
    assert not off.enabled
    span = off.span("request")
    assert span is NO_SPAN and not span and span.child("x") is NO_SPAN
    assert span.traceparent() is None
    span.set("k", 1)
    span.end(error="x")  # all no-ops
    off.shutdown()


def test_unknown_protocol_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="grpc or http/protobuf"):
        Tracing("http://127.0.0.1:1", "router")
