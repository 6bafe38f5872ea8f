"""A worker's Prometheus metrics: request-path timing and counts, the engine snapshot read at
scrape time, role flips, the HTTP endpoint, and one registry per worker."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from router_fakes import FakeEngine

from services.common.grpc_utils import SERVER_OPTIONS, insecure_channel
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.engine.outputs import CompletionOutput, RequestOutput
from services.worker.metrics import WorkerMetrics
from services.worker.server import WorkerServicer
from services.worker.state import WorkerState

pytestmark = [pytest.mark.timeout(30)]


def _stats(**kw: float) -> SimpleNamespace:
    base = dict(num_waiting=2, num_running=3, num_waiting_prompt_tokens=40, kv_utilization=0.25,
                num_preemptions=1, prefix_cache_queries=100, prefix_cache_hits=60)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


class _Engine:
    model_name = "m"

    def __init__(self) -> None:
        self.snapshot: object = _stats()

    def stats(self) -> object:
        if isinstance(self.snapshot, Exception):
            raise self.snapshot
        return self.snapshot


def _metrics(instance: str = "w0") -> tuple[WorkerMetrics, _Engine, WorkerState]:
    engine = _Engine()
    state = WorkerState(instance, "inc", "mixed")
    return WorkerMetrics(engine, state), engine, state


def value(m: WorkerMetrics, name: str, **labels: str) -> float:
    text = generate_latest(m.registry).decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _out(tokens: list[list[int]], finished: bool = False, reason: str | None = None):
    outs = [CompletionOutput(i, "", t, None, reason if finished else None)
            for i, t in enumerate(tokens)]  # fmt: skip
    return RequestOutput("r", [1, 2, 3, 4], outs, finished)


async def _stream(*outs, fail: bool = False):
    for o in outs:
        await asyncio.sleep(0.001)
        yield o
    if fail:
        raise RuntimeError("engine died")


@pytest.mark.asyncio
async def test_track_times_and_counts_one_request() -> None:
    m, _, _ = _metrics()
    outs = [_out([[5]]), _out([[6]]), _out([[7, 8]], finished=True, reason="length")]
    got = [o async for o in m.track(_stream(*outs))]
    assert got == outs
    assert value(m, "epdserve:time_to_first_token_seconds_count") == 1
    assert value(m, "epdserve:inter_token_latency_seconds_count") == 2
    assert value(m, "epdserve:e2e_request_latency_seconds_count") == 1
    assert value(m, "epdserve:time_per_output_token_seconds_count") == 1
    assert value(m, "epdserve:generation_tokens_total") == 4
    assert value(m, "epdserve:prompt_tokens_total") == 4
    assert value(m, "epdserve:request_success_total", finished_reason="length") == 1
    assert value(m, "epdserve:request_success_total", finished_reason="abort") == 0
    # The series carry the worker's model and id.
    assert value(m, "epdserve:generation_tokens_total", model_name="m", instance="w0") == 4


@pytest.mark.asyncio
async def test_track_counts_an_abandoned_stream_as_abort_and_a_failure_as_error() -> None:
    m, _, _ = _metrics()
    gen = m.track(_stream(_out([[5]]), _out([[6]]), _out([[7]], finished=True, reason="stop")))
    assert (await anext(gen)).outputs[0].token_ids == [5]
    await gen.aclose()  # the caller went away
    assert value(m, "epdserve:request_success_total", finished_reason="abort") == 1
    assert value(m, "epdserve:e2e_request_latency_seconds_count") == 0
    with pytest.raises(RuntimeError):
        [o async for o in m.track(_stream(_out([[5]]), fail=True))]
    assert value(m, "epdserve:request_success_total", finished_reason="error") == 1
    assert value(m, "epdserve:time_to_first_token_seconds_count") == 2


@pytest.mark.asyncio
async def test_track_labels_each_request_with_the_role_it_ran_in() -> None:
    """The request path's series are made once per role (WorkerMetrics._role_series): a
    request after a role flip counts under the new role, one before under the old."""
    m, _, state = _metrics()
    done = [_out([[5]]), _out([[6]], finished=True, reason="stop")]
    [o async for o in m.track(_stream(*done))]
    state.role = "decode"
    [o async for o in m.track(_stream(*done))]
    [o async for o in m.track(_stream(_out([[7]], finished=True, reason="abort")))]
    for role in ("mixed", "decode"):
        for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
            n = 2 if role == "decode" and name != "inter_token_latency" else 1
            assert value(m, f"epdserve:{name}_seconds_count", role=role) == n, (name, role)
    assert value(m, "epdserve:request_success_total", finished_reason="stop") == 2
    assert value(m, "epdserve:request_success_total", finished_reason="abort") == 1


@pytest.mark.asyncio
async def test_single_token_request_has_no_tpot() -> None:
    m, _, _ = _metrics()
    [o async for o in m.track(_stream(_out([[5]], finished=True, reason="length")))]
    assert value(m, "epdserve:time_to_first_token_seconds_count") == 1
    assert value(m, "epdserve:time_per_output_token_seconds_count") == 0
    assert value(m, "epdserve:inter_token_latency_seconds_count") == 0


def test_engine_snapshot_and_role_are_read_at_scrape_time() -> None:
    m, engine, state = _metrics()
    assert value(m, "epdserve:num_requests_running") == 3
    assert value(m, "epdserve:num_requests_waiting") == 2
    assert value(m, "epdserve:num_waiting_prompt_tokens") == 40
    assert value(m, "epdserve:kv_cache_usage_perc") == 0.25
    assert value(m, "epdserve:prefix_cache_queries_total") == 100
    assert value(m, "epdserve:prefix_cache_hits_total") == 60
    assert value(m, "epdserve:num_preemptions_total") == 1
    assert value(m, "epdserve:role_flips_total") == 0
    assert value(m, "epdserve:worker_role", role="mixed") == 1
    engine.snapshot = _stats(num_running=0)
    state.role, state.role_epoch = "decode", 3
    assert value(m, "epdserve:num_requests_running") == 0
    assert value(m, "epdserve:role_flips_total") == 2
    assert value(m, "epdserve:worker_role", role="decode") == 1
    assert value(m, "epdserve:worker_role", role="mixed") == 0
    # A dead engine leaves the request-path metrics scrapeable.
    engine.snapshot = RuntimeError("engine died")
    text = generate_latest(m.registry).decode()
    assert "epdserve:num_requests_running" not in text and "epdserve:role_flips_total" in text


def test_requests_by_class_split_online_from_offline() -> None:
    m, engine, _ = _metrics()
    engine.snapshot = _stats(num_offline_waiting=2, num_offline_running=1)
    by = {(c, st): value(m, "epdserve:num_requests_by_class", service_class=c, state=st)
          for c in ("online", "offline") for st in ("waiting", "running")}  # fmt: skip
    assert by == {("online", "waiting"): 0, ("online", "running"): 2,
                  ("offline", "waiting"): 2, ("offline", "running"): 1}  # fmt: skip


def test_step_cost_is_a_gauge_in_seconds() -> None:
    m, engine, _ = _metrics()
    engine.snapshot = _stats(step_fixed_ms=31.0, step_token_ms=2.5)
    assert value(m, "epdserve:step_fixed_seconds") == 0.031
    assert value(m, "epdserve:step_token_seconds") == 0.0025


def test_pd_metrics_exist_at_zero_and_record() -> None:
    m, _, _ = _metrics()
    assert value(m, "epdserve:kv_transfer_bytes_total") == 0
    assert value(m, "epdserve:kv_transfer_seconds_count") == 0
    assert value(m, "epdserve:kv_transfer_failures_total") == 0
    m.kv_transfer.record(4096, 0.01)
    m.kv_transfer.record_failure()
    assert value(m, "epdserve:kv_transfer_bytes_total") == 4096
    assert value(m, "epdserve:kv_transfer_seconds_count") == 1
    assert value(m, "epdserve:kv_transfer_failures_total") == 1


def test_workers_in_one_process_have_their_own_registries() -> None:
    a, _, _ = _metrics("a")
    b, _, _ = _metrics("b")
    a.generation_tokens.inc(5)
    assert value(a, "epdserve:generation_tokens_total") == 5
    assert value(b, "epdserve:generation_tokens_total") == 0


def test_http_endpoint_serves_the_registry() -> None:
    m, _, _ = _metrics()
    port = m.serve("127.0.0.1", 0)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert r.status_code == 200
        assert 'epdserve:num_requests_running{instance="w0",model_name="m"} 3.0' in r.text
    finally:
        m.close()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.asyncio
async def test_servicer_generate_feeds_its_metrics() -> None:
    engine = FakeEngine()
    servicer = WorkerServicer(engine, WorkerState("w", "inc", "mixed"), load_interval_ms=20)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.WorkerServiceStub(channel)
            req = pb.GenerateRequest(request_id="r1", prompt_token_ids=[1, 2, 3],
                                     params=pb.SamplingParams(max_tokens=4))  # fmt: skip
            msgs = [msg async for msg in stub.Generate(req, timeout=5)]
        assert msgs[-1].finished
        m = servicer.metrics
        for _ in range(500):  # the end is counted just after the last message is sent
            if value(m, "epdserve:request_success_total", finished_reason="length"):
                break
            await asyncio.sleep(0.01)
        assert value(m, "epdserve:request_success_total", finished_reason="length") == 1
        assert value(m, "epdserve:generation_tokens_total", model_name="fake-model") == 4
        assert value(m, "epdserve:time_to_first_token_seconds_count", instance="w") == 1
    finally:
        servicer.closing.set()
        await server.stop(grace=None)


def test_observe_prefill_counts_a_pd_prefill() -> None:
    m, _, _ = _metrics()
    m.observe_prefill(0.2, prompt_tokens=30)
    assert value(m, "epdserve:time_to_first_token_seconds_count") == 1
    assert value(m, "epdserve:time_to_first_token_seconds_sum") == pytest.approx(0.2)
    assert value(m, "epdserve:prompt_tokens_total") == 30
