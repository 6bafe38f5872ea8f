"""The router's Prometheus metrics, the PD/rebalancer metrics, and their documentation."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.common.membership import InstanceInfo
from services.common.pd_metrics import REBALANCE_ACTIONS, REBALANCE_POLICIES
from services.encoder.metrics import ImageMetrics
from services.engine.speculative.stats import SpecStats
from services.kvstore.index import KVIndex
from services.kvstore.metrics import KVStoreMetrics
from services.router.metrics import OUTCOMES, RouterMetrics, outcome_of
from services.router.routing.starting import StartingWorkers
from services.worker.metrics import WorkerMetrics
from services.worker.state import WorkerState

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def samples(registry) -> list:
    text = generate_latest(registry).decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def value(m: RouterMetrics, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples(m.registry)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.parametrize(
    "status,outcome",
    [(200, "success"), ("200", "success"), (400, "invalid"), (404, "invalid"), (499, "cancelled"),
     (500, "error"), (502, "error"), (503, "unavailable"), (504, "timeout")],
)  # fmt: skip
def test_outcome_of_status(status: int | str, outcome: str) -> None:
    assert outcome_of(status) == outcome
    assert outcome in OUTCOMES


def test_series_exist_at_zero() -> None:
    m = RouterMetrics()
    names = {s.name for s in samples(m.registry)}
    assert {"epdserve:router_requests_total", "epdserve:workers",
            "epdserve:rebalance_decisions_total",
            "epdserve:router_num_requests_running"} <= names  # fmt: skip
    assert value(m, "epdserve:workers", role="decode", state="serving") == 0
    for policy in REBALANCE_POLICIES:
        for action in REBALANCE_ACTIONS:
            assert any(
                s.labels == {"policy": policy, "action": action}
                for s in samples(m.registry)
                if s.name == "epdserve:rebalance_decisions_total"
            )


def test_requests_latency_and_tokens() -> None:
    m = RouterMetrics()
    m.count_request("chat", 200)
    m.count_request("chat", "503")
    m.count_request("messages", 400)
    m.first_token("chat", "tiny", started=0.0)
    m.done("chat", "tiny", started=0.0, prompt=7, completion=3)
    assert value(m, "epdserve:router_requests_total", api="chat", outcome="success") == 1
    assert value(m, "epdserve:router_requests_total", api="chat", outcome="unavailable") == 1
    assert value(m, "epdserve:router_requests_total", api="messages", outcome="invalid") == 1
    assert value(m, "epdserve:router_time_to_first_token_seconds_count", model_name="tiny") == 1
    assert value(m, "epdserve:router_e2e_request_latency_seconds_count", api="chat") == 1
    assert value(m, "epdserve:router_prompt_tokens_total", model_name="tiny") == 7
    assert value(m, "epdserve:router_generation_tokens_total", model_name="tiny") == 3


def _handle(iid: str, role: str, reachable: bool = True, draining: bool = False, load=True,
            model: str = "m", state: str = "serving"):  # fmt: skip
    report = SimpleNamespace(num_waiting=2, num_waiting_prompt_tokens=50, kv_utilization=0.5,
                             images_waiting=3, images_encoding=1,
                             draining=False) if load else None  # fmt: skip
    info = SimpleNamespace(role=role, draining=draining, model=model, state=state)
    return SimpleNamespace(id=iid, info=info, load=report, reachable=lambda: reachable)


def test_update_pool_counts_workers_by_role_and_state() -> None:
    m = RouterMetrics()
    pool = SimpleNamespace(starting=StartingWorkers(), handles={
        "a": _handle("a", "prefill"), "b": _handle("b", "decode"),
        "c": _handle("c", "decode", draining=True), "d": _handle("d", "decode", reachable=False),
        "e": _handle("e", "mixed", load=False),
    })  # fmt: skip
    m.update_pool(pool)
    assert value(m, "epdserve:workers", role="prefill", state="serving") == 1
    assert value(m, "epdserve:workers", role="decode", state="serving") == 1
    assert value(m, "epdserve:workers", role="decode", state="draining") == 1
    assert value(m, "epdserve:workers", role="decode", state="unreachable") == 1
    assert value(m, "epdserve:router_worker_num_waiting_prompt_tokens", instance="a",
                 role="prefill") == 50  # fmt: skip
    assert value(m, "epdserve:router_worker_kv_cache_usage_perc", instance="b") == 0.5
    assert value(m, "epdserve:router_worker_images_pending", instance="b") == 4
    # A worker that left disappears from the per-worker gauges; the counts go back to zero.
    m.update_pool(
        SimpleNamespace(starting=StartingWorkers(), handles={"a": _handle("a", "prefill")})
    )
    assert value(m, "epdserve:router_worker_kv_cache_usage_perc", instance="b") == 0
    assert value(m, "epdserve:workers", role="decode", state="serving") == 0
    assert value(m, "epdserve:workers", role="prefill", state="serving") == 1
    # Each base model's workers are counted apart; per-worker gauges name the model.
    m.update_pool(SimpleNamespace(starting=StartingWorkers(), handles={
        "a": _handle("a", "mixed", model="m"), "x": _handle("x", "mixed", model="other"),
    }))  # fmt: skip
    assert value(m, "epdserve:workers", model_name="other", role="mixed", state="serving") == 1
    assert value(m, "epdserve:workers", model_name="other", role="decode", state="serving") == 0
    assert value(m, "epdserve:workers", role="mixed", state="serving") == 2
    assert value(m, "epdserve:router_worker_num_requests_waiting", model_name="other") == 2
    # Asleep; loading another model: draining (reachable) or restarting (unreachable).
    m.update_pool(SimpleNamespace(starting=StartingWorkers(), handles={
        "s": _handle("s", "mixed", state="sleeping"),
        "l": _handle("l", "mixed", state="loading", draining=True),
        "r": _handle("r", "mixed", state="loading", reachable=False),
    }))  # fmt: skip
    assert value(m, "epdserve:workers", role="mixed", state="sleeping") == 1
    assert value(m, "epdserve:workers", role="mixed", state="loading") == 2
    assert value(m, "epdserve:workers", role="mixed", state="unreachable") == 0
    # Starting: listed in etcd, its model not loaded yet (no handle).
    starting = StartingWorkers()
    starting.update({"w": InstanceInfo("w", "", "decode", 0, "new", "i", 1, "h", state="starting")})
    m.update_pool(SimpleNamespace(starting=starting, handles={}))
    assert value(m, "epdserve:workers", model_name="new", role="decode", state="starting") == 1
    assert value(m, "epdserve:workers", model_name="new", role="mixed", state="starting") == 0


def test_rebalance_decisions() -> None:
    m = RouterMetrics()
    m.rebalance.decision("queue", "flip_to_decode")
    assert value(m, "epdserve:rebalance_decisions_total", policy="queue",
                 action="flip_to_decode") == 1  # fmt: skip
    with pytest.raises(ValueError, match="unknown rebalance action"):
        m.rebalance.decision("queue", "flip")


def test_two_routers_do_not_share_series() -> None:
    a, b = RouterMetrics(), RouterMetrics()
    a.count_request("chat", 200)
    assert value(b, "epdserve:router_requests_total", outcome="success") == 0


def test_every_metric_is_documented() -> None:
    engine = SimpleNamespace(model_name="m", stats=lambda: SimpleNamespace(
        num_waiting=0, num_running=0, num_waiting_prompt_tokens=0, kv_utilization=0.0,
        spec=SpecStats(1, 2, 1, [1, 1], [1, 0])))  # fmt: skip
    worker = WorkerMetrics(engine, WorkerState("w", "inc", "mixed"))
    ImageMetrics(worker.registry, "m", "w")  # encode / prefill / mixed workers with images
    worker.watch_staging(SimpleNamespace(num_slots=4, num_free=4))  # KV through staging slots
    worker.watch_draft_states(SimpleNamespace(handoffs={"push": 1, "grpc": 0}, free_bytes=8))
    kvstore = KVStoreMetrics("k", KVIndex(), SimpleNamespace(restarts=0, alive=True))  # type: ignore[arg-type]
    documented = set(re.findall(r"`(epdserve:[a-z0-9_:]+)`", DOC.read_text()))
    exported = set()
    for registry in (RouterMetrics().registry, worker.registry, kvstore.registry):
        for family in registry.collect():
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert exported, "no metric exported"
    assert not exported - documented, f"undocumented in docs/metrics.md: {exported - documented}"
    assert not documented - exported, f"documented but not exported: {documented - exported}"
