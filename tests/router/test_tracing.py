"""Request phases and traces through a real gateway and an in-process worker (FakeEngine):
one OpenTelemetry trace per request, from the router's root span to the worker's span of
the call, received by an in-process OTLP collector; the router's queue phase histogram; and
the OpenTelemetry SDK stays unimported without --otlp-traces-endpoint."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import TYPE_CHECKING

import httpx
import pytest
import pytest_asyncio
from router_fakes import FakeEngine, start_fake_worker, start_gateway, until_healthy

from services.common.tracing import Tracing
from services.engine.async_engine import EngineDeadError
from tests.deps import OTEL, require
from tests.waits import until

pytestmark = [pytest.mark.timeout(60)]
require("opentelemetry.sdk", OTEL)

if TYPE_CHECKING:
    from tests.otlp_collector import SpanRecord


@pytest.fixture
def collector(monkeypatch):
    # Export every 100 ms instead of every 5 s.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    from tests.otlp_collector import OTLPCollector

    with OTLPCollector() as c:
        yield c


@pytest_asyncio.fixture(params=[False, True], ids=["call", "worker_mux"])
async def traced(etcd, collector, request):
    tracing = Tracing(collector.endpoint, "epdserve-worker", "w1")
    worker = await start_fake_worker(etcd.endpoint, "traced", "w1", FakeEngine(), tracing=tracing)
    gw = await start_gateway(etcd.endpoint, "traced", otlp_traces_endpoint=collector.endpoint,
                             worker_mux=request.param)  # fmt: skip
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        await until_healthy(client)
        yield client, gw
    await asyncio.wait_for(gw.stop(), 15)
    await asyncio.wait_for(worker.stop(), 15)
    await asyncio.to_thread(tracing.shutdown)


# The spans a request's trace holds once all are exported. NOTE: the router's Generate span can
# end after its root: the router answers at the worker's finished message (9f86567) and ends
# the call when its status comes; waiting for the root and any worker span alone saw that span
# missing once in CI (KeyError ('epdserve-router', 'Generate'), session 18).
SPANS = {("epdserve-router", "request"), ("epdserve-router", "queue"),
         ("epdserve-router", "Generate"), ("epdserve-worker", "Generate")}  # fmt: skip


def complete(traces: dict[str, list[SpanRecord]], n: int) -> bool:
    """``n`` traces, each with every span of ``SPANS``."""
    done = [t for t in traces.values() if SPANS <= {(s.service, s.name) for s in t}]
    return len(done) >= n


@pytest.mark.asyncio
async def test_one_trace_per_request_spans_router_and_worker(traced, collector) -> None:
    client, gw = traced
    r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi there",
                                                   "max_tokens": 3})  # fmt: skip
    assert r.status_code == 200, r.text
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3, "stream": True}  # fmt: skip
    async with client.stream("POST", "/v1/chat/completions", json=body) as s:
        assert s.status_code == 200
        await s.aread()

    traces = await asyncio.to_thread(collector.wait_for, lambda t: complete(t, 2))
    assert len(traces) == 2, {k: [s.name for s in v] for k, v in traces.items()}
    request_ids = set()
    for spans in traces.values():
        by_name = {(s.service, s.name): s for s in spans}
        root = by_name[("epdserve-router", "request")]
        assert root.parent_id == ""
        request_ids.add(root.attributes["epdserve.request.id"])
        assert root.attributes["gen_ai.request.model"] == "fake-model"
        queue = by_name[("epdserve-router", "queue")]
        call = by_name[("epdserve-router", "Generate")]
        assert queue.parent_id == call.parent_id == root.span_id
        assert queue.end_ns <= call.start_ns
        assert call.attributes["epdserve.worker.id"] == "w1"
        assert call.attributes["epdserve.worker.role"] == "mixed"
        assert call.attributes["rpc.grpc.status_code"] == 0
        # The worker's span hangs under the router's call: the context crossed in gRPC metadata.
        served = by_name[("epdserve-worker", "Generate")]
        assert served.parent_id == call.span_id
        assert served.attributes["epdserve.worker.id"] == "w1"
        assert served.attributes["epdserve.request.id"] == root.attributes["epdserve.request.id"]
        assert not any(s.error for s in spans)
    assert len(request_ids) == 2
    # The router's queue phase was timed once per request.
    hist = gw.gateway.metrics.phase.labels("fake-model", "queue", "router")
    assert hist._sum.get() > 0
    assert sum(b.get() for b in hist._buckets) == 2


@pytest.mark.asyncio
async def test_an_abandoned_stream_ends_its_trace_as_cancelled(traced, collector) -> None:
    client, _ = traced
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 50, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as s:
        async for line in s.aiter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk

    def cancelled(traces: dict[str, list[SpanRecord]]) -> bool:
        """A trace whose root ended in error, with the router's call in it. NOTE: that call's
        span may be exported after the root (see SPANS); on a loaded host it was missing."""
        return any(
            any(s.name == "request" and s.error for s in spans)
            and ("epdserve-router", "Generate") in {(s.service, s.name) for s in spans}
            for spans in traces.values()
        )

    traces = await asyncio.to_thread(collector.wait_for, cancelled)
    (spans,) = traces.values()
    root = next(s for s in spans if s.name == "request")
    assert root.error
    call = next(s for s in spans if s.service == "epdserve-router" and s.name == "Generate")
    assert call.error  # cancelled by the router when its client left


# NOTE: a fresh interpreter importing the router and worker stacks (torch among them) needs
# ~3 s of CPU; at load 28 on 2 cores it took over 60 s wall, the module's bound (2 of 2 runs
# of flakeC's soak failed there). A bound on a hang, not on speed.
@pytest.mark.timeout(300)
def test_tracing_is_off_and_unimported_by_default() -> None:
    code = (
        "import sys\n"
        "from services.router.config import RouterConfig\n"
        "from services.worker.config import WorkerConfig\n"
        "import services.router.server, services.worker.main\n"
        "from services.common.tracing import Tracing\n"
        "assert RouterConfig().otlp_traces_endpoint == ''\n"
        "assert WorkerConfig(register=False).otlp_traces_endpoint == ''\n"
        "assert not Tracing('', 'x').enabled\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry.sdk')]\n"
        "assert not loaded, loaded\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr


class DiesOnceMidStream(FakeEngine):
    """The first request any of these engines runs dies after its first output (``died``
    is shared); every other request runs as on a FakeEngine."""

    died: list[str] = []

    async def generate(self, request_id, prompt_token_ids, params, resume=None, lora=None):
        async for out in super().generate(request_id, prompt_token_ids, params, resume):
            yield out
            if not self.died:
                self.died.append(request_id)
                raise EngineDeadError("engine died mid-stream")


@pytest.mark.asyncio
async def test_a_streams_migration_is_traced(etcd, collector, monkeypatch) -> None:
    """A stream's steps after its first run in another task than the first (the gateway
    awaits the first step in a task of its own): the worker call that a migration makes
    there belongs to the request's trace as well (it was untraced)."""
    monkeypatch.setattr(DiesOnceMidStream, "died", [])
    tracing = Tracing(collector.endpoint, "epdserve-worker", "w")
    workers = [await start_fake_worker(etcd.endpoint, "migrated", f"w{i}", DiesOnceMidStream(),
                                       tracing=tracing) for i in range(2)]  # fmt: skip
    gw = await start_gateway(etcd.endpoint, "migrated", otlp_traces_endpoint=collector.endpoint)
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
            await until_healthy(client)
            await until(lambda: len(gw.gateway.pool.candidates("mixed", "fake-model")) == 2,
                        what="both workers usable")  # fmt: skip
            body = {"model": "fake-model", "prompt": "hi", "max_tokens": 6, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as s:
                assert s.status_code == 200
                text = (await s.aread()).decode()
        assert "[DONE]" in text and '"error"' not in text, text
        assert DiesOnceMidStream.died

        def calls(traces: dict[str, list[SpanRecord]]) -> list[SpanRecord]:
            return [s for t in traces.values() for s in t
                    if (s.service, s.name) == ("epdserve-router", "Generate")]  # fmt: skip

        traces = await asyncio.to_thread(collector.wait_for, lambda t: len(calls(t)) >= 2)
        assert len(traces) == 1, {k: [s.name for s in v] for k, v in traces.items()}
        first, second = sorted(calls(traces), key=lambda s: s.start_ns)
        assert first.attributes["epdserve.worker.id"] != second.attributes["epdserve.worker.id"]
        assert first.error and not second.error
    finally:
        await asyncio.wait_for(gw.stop(), 15)
        for w in workers:
            await asyncio.wait_for(w.stop(), 15)
        await asyncio.to_thread(tracing.shutdown)
