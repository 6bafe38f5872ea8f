"""LoRA-aware routing: a request naming an adapter goes only to workers holding it, and the
adapter's hash chain (for the KV index) is the engine's."""

from __future__ import annotations

import pytest
from fake_handles import fake_handle, fake_pool

from services.engine.block_hash import ROOT_HASH, adapter_hash_root
from services.router.routing.kv_index import prompt_hash_root
from services.router.routing.policies.base import RouteRequest


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
