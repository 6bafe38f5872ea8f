"""Routing policies: found by name, and pick the way their docstrings say."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.common.proto import worker_pb2 as pb
from services.router.routing.policies.base import RouteRequest, RoutingPolicy
from services.router.routing.policies.factory import available_policies, create_policy


@dataclass
class W:
    id: str
    inflight: int = 0
    ended_since_report: int = 0
    prompt_tokens_ended_since_report: int = 0
    load: pb.LoadReport | None = None


REQ = RouteRequest("r", 10)


def test_factory_knows_each_policy() -> None:
    assert {"round_robin", "least_load"} <= set(available_policies())
    for name in available_policies():
        p = create_policy(name)
        assert isinstance(p, RoutingPolicy) and p.name == name
    with pytest.raises(ValueError, match="unknown routing policy"):
        create_policy("random_guess")


def test_round_robin_cycles() -> None:
    p = create_policy("round_robin")
    ws = [W("a"), W("b"), W("c")]
    assert [p.select(ws, REQ).id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_load_prefers_idle_worker() -> None:
    p = create_policy("least_load")
    busy = W("a", inflight=3)
    queued = W("b", load=pb.LoadReport(num_inflight=0, num_waiting_prompt_tokens=4096))
    idle = W("c", load=pb.LoadReport(num_inflight=0, kv_utilization=0.5))
    assert p.select([busy, queued, idle], REQ).id == "c"
    # the worker's own report counts too (other routers' requests)
    other = W("d", load=pb.LoadReport(num_inflight=5))
    assert p.select([other, W("e", inflight=1)], REQ).id == "e"


def test_least_load_spreads_ties() -> None:
    p = create_policy("least_load")
    ws = [W("a"), W("b")]
    assert {p.select(ws, REQ).id for _ in range(4)} == {"a", "b"}
