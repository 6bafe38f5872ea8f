"""The router hashes a prompt into blocks exactly as the engine does: the blocks a real
engine reports, published to a real index servicer, are found by the router's lookup. For a
prompt with images too: the router expands the placeholders from the image sizes and seeds
the chain with the images' content hashes, as a worker's engine does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

import grpc
import pytest

from services.common.proto import kvstore_pb2_grpc as kpb_grpc
from services.engine.block_hash import hash_prompt_blocks
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.kvstore.index import KVEventIn, KVIndex
from services.kvstore.server import KVIndexServicer
from services.router.routing.kv_index import KVIndexClient, prompt_hash_root
from services.router.routing.policies.base import RouteRequest
from services.worker.kv_events import kv_layout_key
from tests.conftest import image_bytes

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


@asynccontextmanager
async def index_client(model: str, layout: str, events) -> AsyncIterator[KVIndexClient]:
    """The router's client of a real index servicer holding ``events`` as worker w1's."""
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
        yield client
    finally:
        await channel.close()
        await server.stop(None)


def worker_view(wid: str, layout: str, block_size: int) -> SimpleNamespace:
    return SimpleNamespace(id=wid, info=SimpleNamespace(
        capacity={"kv_layout": layout, "block_size": block_size}))  # fmt: skip


@pytest.mark.asyncio
async def test_router_lookup_finds_what_the_engine_published(served) -> None:
    model, layout, events = served
    async with index_client(model, layout, events) as client:
        worker, other = worker_view("w1", layout, BS), worker_view("w2", layout, BS)
        route = RouteRequest("r", len(PROMPT), PROMPT)
        await client.annotate(route, model, [worker, other])  # type: ignore[list-item]
        assert route.cached["w1"].device == 5 * BS
        assert "w2" not in route.cached
        # A different prompt shares nothing.
        route = RouteRequest("r2", len(PROMPT), [t + 1 for t in PROMPT])
        await client.annotate(route, model, [worker])  # type: ignore[list-item]
        assert route.cached == {}


# ---- prompts with images ---------------------------------------------------------------------

VL_BS = 4
IMAGES = [image_bytes(56, 84, 1), image_bytes(112, 112, 2)]  # 6 and 16 image tokens
VL_CASES = {"one image": IMAGES[:1], "two images": IMAGES}


def chat_of(n_images: int, text: str = "Describe these pictures") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]
             + [{"type": "image"}] * n_images}]  # fmt: skip


@pytest.fixture(scope="module")
def vl_served(tiny_vl_model_dir):
    """Per case: the router's (expanded ids, images) of the chat, and the engine's KV events
    after a worker served it (its engine prompt built as a worker builds it)."""
    from prometheus_client import CollectorRegistry

    from services.encoder.metrics import ImageMetrics
    from services.engine.image_processing import load_image_processor
    from services.router.features.images import ImageLimits, chat_prompt
    from services.router.tokenization import Tokenizer
    from services.worker.image_inputs import ImageLoader

    tok = Tokenizer.load(str(tiny_vl_model_dir))
    llm = LLM(str(tiny_vl_model_dir), dtype="float32", block_size=VL_BS, max_model_len=256,
              kv_cache_bytes=8 * 1024 * 1024)  # fmt: skip
    metrics = ImageMetrics(CollectorRegistry(), "m", "w1")
    loader = ImageLoader(load_image_processor(str(tiny_vl_model_dir)), None, metrics, 5.0)
    out = {}
    for name, images in VL_CASES.items():
        ids, protos = asyncio.run(chat_prompt(tok, chat_of(len(images)), images, ImageLimits()))
        prompt = asyncio.run(loader.prompt(ids, protos))
        llm.engine.take_kv_events()
        llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0))
        out[name] = (ids, protos, llm.engine.take_kv_events())
    return llm.engine.model_name, kv_layout_key(llm.engine), out


@pytest.mark.parametrize("case", list(VL_CASES))
def test_engine_blocks_of_an_image_prompt_are_the_router_hash_chain(vl_served, case) -> None:
    _, _, out = vl_served
    ids, images, events = out[case]
    stored = [h for e in events if e.kind == "stored" for h in e.block_hashes]
    route = RouteRequest("r", len(ids), ids, [i.hash for i in images])
    expected = hash_prompt_blocks(ids, VL_BS, prompt_hash_root(route))
    assert len(expected) == len(ids) // VL_BS >= 5
    assert stored[: len(expected)] == expected
    # The plain text root (what the router used before) matches none of them.
    assert not set(hash_prompt_blocks(ids, VL_BS)) & set(stored)


@pytest.mark.parametrize("case", list(VL_CASES))
@pytest.mark.asyncio
async def test_router_lookup_finds_an_image_prompt_the_engine_published(vl_served, case) -> None:
    model, layout, out = vl_served
    ids, images, events = out[case]
    hashes = [i.hash for i in images]
    async with index_client(model, layout, events) as client:
        worker = worker_view("w1", layout, VL_BS)
        route = RouteRequest("r", len(ids), ids, hashes)
        await client.annotate(route, model, [worker])  # type: ignore[list-item]
        assert route.cached["w1"].device == len(ids) // VL_BS * VL_BS
        # The same tokens with other images (equal sizes, so equal ids) share nothing.
        route = RouteRequest("r2", len(ids), ids, [h[::-1] for h in hashes])
        await client.annotate(route, model, [worker])  # type: ignore[list-item]
        assert route.cached == {}
