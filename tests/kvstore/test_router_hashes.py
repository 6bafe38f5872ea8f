"""The router hashes a prompt into blocks exactly as the engine does: the blocks a real
engine reports, published to a real index servicer, are found by the router's lookup."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest

from services.common.proto import kvstore_pb2_grpc as kpb_grpc
from services.engine.block_manager import hash_prompt_blocks
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.kvstore.index import KVEventIn, KVIndex
from services.kvstore.server import KVIndexServicer
from services.router.kv_index import KVIndexClient
from services.router.policies.base import RouteRequest
from services.worker.kv_events import kv_layout_key

BS = 16
PROMPT = [(7 * i + 3) % 250 + 1 for i in range(BS * 5 + 3)]  # 5 full blocks and a tail


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """The engine's KV events after serving PROMPT once."""
    llm = LLM(str(tiny_model_dir("llama")), block_size=BS, max_model_len=256,
              kv_cache_bytes=8 * 1024 * 1024)  # fmt: skip
    llm.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0.0))
    events = llm.engine.take_kv_events()
    return llm.engine.model_name, kv_layout_key(llm.engine), events


def test_engine_blocks_are_the_router_hash_chain(served) -> None:
    _, _, events = served
    stored = [h for e in events if e.kind == "stored" for h in e.block_hashes]
    assert stored[:5] == hash_prompt_blocks(PROMPT, BS)


@pytest.mark.asyncio
async def test_router_lookup_finds_what_the_engine_published(served) -> None:
    model, layout, events = served
    index = KVIndex()
    index.publish(
        "w1", "inc", 1, model, layout,
        [KVEventIn(e.kind, getattr(e, "tier", "device"), e.block_hashes) for e in events],
        reset=True,
    )  # fmt: skip
    server = grpc.aio.server()
    kpb_grpc.add_KVIndexServiceServicer_to_server(KVIndexServicer(index, "kv"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        client = KVIndexClient([], "test")
        stub = kpb_grpc.KVIndexServiceStub(channel)

        async def fixed_stub():  # NOTE: the etcd discovery is tested in the cluster test
            return stub, False

        client.locator.stub = fixed_stub  # type: ignore[method-assign]
        worker = SimpleNamespace(id="w1", info=SimpleNamespace(
            capacity={"kv_layout": layout, "block_size": BS}))  # fmt: skip
        other = SimpleNamespace(id="w2", info=SimpleNamespace(
            capacity={"kv_layout": layout, "block_size": BS}))  # fmt: skip
        route = RouteRequest("r", len(PROMPT), PROMPT)
        await client.annotate(route, model, [worker, other])  # type: ignore[list-item]
        assert route.cached["w1"].device == 5 * BS
        assert "w2" not in route.cached
        # A different prompt shares nothing.
        route = RouteRequest("r2", len(PROMPT), [t + 1 for t in PROMPT])
        await client.annotate(route, model, [worker])  # type: ignore[list-item]
        assert route.cached == {}
    finally:
        await channel.close()
        await server.stop(None)
