"""Phases and traces of PD requests on real processes (router, prefill and decode workers
with --otlp-traces-endpoint): one trace per request, received by an in-process OTLP
collector, with the router's spans and each worker's spans per phase under the router's
calls; and the phase histograms each process exports."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import httpx
import pytest
from cluster_helpers import TINY_NAME, start_cluster
from prometheus_client.parser import text_string_to_metric_families

from tests.deps import MOONCAKE, OTEL, require

require("mooncake.engine", MOONCAKE)
require("opentelemetry.sdk", OTEL)

if TYPE_CHECKING:
    from tests.otlp_collector import SpanRecord
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

N = 2
PROMPT = "The history of the printing press begins in the fifteenth century when " * 3


@pytest.fixture(scope="module")
def collector():
    from tests.otlp_collector import OTLPCollector

    with OTLPCollector() as c:
        yield c


@pytest.fixture(scope="module")
def traced_pd(tiny_model_dir, collector):
    old = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # the children export every 100 ms
    try:
        tracing = {"otlp_traces_endpoint": collector.endpoint}
        c = start_cluster(
            tiny_model_dir("llama"), workers=0, prefill=1, decode=1,
            router_overrides=tracing, worker_overrides=tracing,
        )  # fmt: skip
    finally:
        if old is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY")
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = old
    yield c
    c.stop()


@pytest.fixture(scope="module")
def requests_sent(traced_pd) -> list[str]:
    ids = []
    body = {"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    for _ in range(N):
        with httpx.stream("POST", traced_pd.base_url + "/v1/completions", json=body,
                          timeout=60) as r:  # fmt: skip
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
        ids.append(re.search(r'"id": ?"([^"]+)"', lines[0]).group(1))  # type: ignore[union-attr]
    return ids


ROUTER_SPANS = {"request", "queue", "Reserve", "Prefill", "Decode"}
WORKER_SPANS = {"Reserve", "reserve", "Prefill", "prefill", "kv_transfer", "Decode",
                "decode_queue"}  # fmt: skip


def whole(spans: list[SpanRecord]) -> bool:
    names = {(s.service, s.name) for s in spans}
    return {("epdserve-router", n) for n in ROUTER_SPANS} | {
        ("epdserve-worker", n) for n in WORKER_SPANS
    } <= names


def test_one_trace_per_request_across_router_and_workers(requests_sent, collector) -> None:
    traces = collector.wait_for(lambda t: sum(whole(v) for v in t.values()) >= N)
    assert len(traces) == N, {k: sorted(s.name for s in v) for k, v in traces.items()}
    seen_ids = set()
    for spans in traces.values():
        assert whole(spans), sorted((s.service, s.name) for s in spans)
        router = {s.name: s for s in spans if s.service == "epdserve-router"}
        worker = {s.name: s for s in spans if s.service == "epdserve-worker"}
        root = router["request"]
        seen_ids.add(root.attributes["epdserve.request.id"])
        for name in ROUTER_SPANS - {"request"}:
            assert router[name].parent_id == root.span_id, name
        # Who did what: the decode worker (worker-1) reserved and decoded, the prefill worker
        # (worker-0) prefilled; the worker's own spans say the same.
        for name, wid, role in (("Reserve", "worker-1", "decode"), ("Prefill", "worker-0", "prefill"),
                                ("Decode", "worker-1", "decode")):  # fmt: skip
            call, served = router[name], worker[name]
            assert call.attributes["epdserve.worker.id"] == wid
            assert call.attributes["epdserve.worker.role"] == role
            assert served.parent_id == call.span_id  # the context crossed in gRPC metadata
            assert served.attributes["epdserve.worker.id"] == wid
            assert served.attributes["epdserve.worker.role"] == role
            assert (
                served.attributes["epdserve.request.id"] in root.attributes["epdserve.request.id"]
            )
        for phase, call in (("reserve", "Reserve"), ("prefill", "Prefill"),
                            ("kv_transfer", "Prefill"), ("decode_queue", "Decode")):  # fmt: skip
            assert worker[phase].parent_id == worker[call].span_id, phase
        # The phases follow each other: queue, reserve, prefill compute, KV tail, decode.
        slack = 5_000_000  # ns: each process turns its monotonic clock into wall time itself
        assert router["queue"].end_ns <= router["Reserve"].start_ns
        assert router["Reserve"].end_ns <= router["Prefill"].start_ns
        assert worker["prefill"].end_ns <= worker["kv_transfer"].start_ns + slack
        assert router["Prefill"].start_ns <= worker["prefill"].start_ns + slack
        assert worker["kv_transfer"].end_ns <= router["Prefill"].end_ns + slack
        assert router["Prefill"].end_ns <= router["Decode"].start_ns
        assert not any(s.error for s in spans), [s.name for s in spans if s.error]
    assert seen_ids == set(requests_sent)


def scrape(url: str) -> list:
    text = httpx.get(url, timeout=5).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip


def test_phase_histograms(traced_pd, requests_sent) -> None:
    prefill, decode = (
        scrape(f"http://127.0.0.1:{w.ready_field('metrics_port')}/metrics")
        for w in traced_pd.workers
    )
    router = scrape(traced_pd.base_url + "/metrics")
    count = "epdserve:request_phase_seconds_count"
    assert value(prefill, count, phase="prefill", role="prefill") == N
    assert value(prefill, count, phase="kv_transfer", role="prefill") == N
    assert value(decode, count, phase="reserve", role="decode") == N
    assert value(decode, count, phase="decode_queue", role="decode") == N
    assert value(prefill, count, phase="decode_queue") == value(decode, count, phase="prefill") == 0
    # Request-path histograms carry the role: the decode worker's TTFT is its decode queue.
    assert value(decode, "epdserve:time_to_first_token_seconds_count", role="decode") == N
    assert value(prefill, "epdserve:time_to_first_token_seconds_count", role="prefill") == N
    assert value(decode, "epdserve:inter_token_latency_seconds_count", role="decode") == N * 4
    rcount = "epdserve:router_request_phase_seconds_count"
    for phase, role in (("queue", "router"), ("reserve", "decode"), ("prefill", "prefill")):
        assert value(router, rcount, phase=phase, role=role, model_name=TINY_NAME) == N, phase
    # The prefill worker's compute and KV tail happen inside the router's Prefill call.
    rsum = "epdserve:router_request_phase_seconds_sum"
    inside = value(prefill, "epdserve:request_phase_seconds_sum", phase="prefill") + value(
        prefill, "epdserve:request_phase_seconds_sum", phase="kv_transfer"
    )
    assert 0 < inside <= value(router, rsum, phase="prefill")
