"""LoRA-aware routing: a request naming an adapter goes only to workers holding it, and the
adapter's hash chain (for the KV index) is the engine's."""

from __future__ import annotations

import pytest
from fake_handles import fake_handle, fake_pool

from services.common.proto import worker_pb2 as pb
from services.engine.block_hash import ROOT_HASH, adapter_hash_root
from services.router.routing.kv_index import prompt_hash_root
from services.router.routing.lora_affinity import prefer_resident
from services.router.routing.orchestrator import Orchestrator
from services.router.routing.policies.base import RouteRequest
from services.router.routing.policies.least_load import LeastLoadPolicy
from services.router.routing.retry import Attempts


@pytest.mark.asyncio
async def test_only_holders_serve_an_adapter() -> None:
    # Async: a handle opens a grpc.aio channel, which needs the running loop (outside one it
    # took the thread's default loop, gone once another test closed it).
    a, b = fake_handle("w-a", None), fake_handle("w-b", None)
    a.lora_adapters = frozenset({"sql"})
    pool = fake_pool([a, b])
    assert [h.id for h in pool.candidates("mixed", "m")] == ["w-a", "w-b"]
    assert [h.id for h in pool.candidates("mixed", "sql")] == ["w-a"]
    assert pool.candidates("mixed", "chat") == []
    assert pool.adapters() == {"sql": "m"}
    assert pool.lora_of("sql") == "sql" and pool.lora_of("m") == ""
    assert pool.may_serve("sql") and not pool.may_serve("chat")


def test_adapter_seeds_the_routing_hash_chain() -> None:
    plain = RouteRequest("r", 4, [1, 2, 3, 4])
    sql = RouteRequest("r", 4, [1, 2, 3, 4], lora="sql")
    assert prompt_hash_root(plain) == ROOT_HASH
    assert prompt_hash_root(sql) == adapter_hash_root(ROOT_HASH, "sql") != ROOT_HASH


def _loaded(h, inflight: int, resident: set[str], slots: int = 2):
    h.load = pb.LoadReport(num_inflight=inflight, lora_slots=slots)
    h.lora_adapters = frozenset({"sql", "chat"})
    h.lora_resident, h.lora_slots = frozenset(resident), slots
    return h


@pytest.mark.asyncio
async def test_affinity_prefers_slot_holders_until_load_says_otherwise() -> None:
    a = _loaded(fake_handle("w-a", None), 0, set())
    b = _loaded(fake_handle("w-b", None), 0, {"sql"})
    assert prefer_resident([a, b], "sql", slack=2) == [b]
    assert prefer_resident([a, b], "", slack=2) == [a, b]  # the base model: all
    b.load.num_inflight = 2  # within the slack of the idle one: still the holder
    assert prefer_resident([a, b], "sql", slack=2) == [b]
    b.load.num_inflight = 3  # past it: load decides
    assert prefer_resident([a, b], "sql", slack=2) == [a, b]


@pytest.mark.asyncio
async def test_an_adapter_resident_nowhere_goes_where_a_slot_is_free() -> None:
    a = _loaded(fake_handle("w-a", None), 0, {"x", "y"})  # both slots taken
    b = _loaded(fake_handle("w-b", None), 1, {"x"})
    assert prefer_resident([a, b], "sql", slack=2) == [b]
    b.load.num_inflight = 5  # a free slot does not outweigh the load
    assert prefer_resident([a, b], "sql", slack=2) == [a, b]
    b.lora_slots = 0  # unknown slots (an older worker): every candidate
    b.load.num_inflight = 0
    assert prefer_resident([a, b], "sql", slack=2) == [a, b]


@pytest.mark.asyncio
async def test_the_router_keeps_an_adapter_where_it_sent_it() -> None:
    """A burst for one adapter stays on the worker that got its first request, before any
    load report says the adapter is resident there: the choice notes it (note_routed)."""
    a = _loaded(fake_handle("w-a", None), 0, set())
    b = _loaded(fake_handle("w-b", None), 0, set())
    orch = Orchestrator(fake_pool([a, b]), LeastLoadPolicy(), 10.0, 2, lora_slack=2.0)
    picks = []
    for _ in range(3):
        h = await orch._choose("sql", "r", [1, 2, 3], (), Attempts(orch.poison))
        assert h is not None
        h.inflight += 1  # the request runs there
        picks.append(h.id)
    assert len(set(picks)) == 1, picks
    assert "sql" in orch.pool.handles[picks[0]].lora_routed
    # Base-model requests are not held to it: least load sends the next one elsewhere.
    h = await orch._choose("m", "r", [1, 2, 3], (), Attempts(orch.poison))
    assert h is not None and h.id != picks[0]
