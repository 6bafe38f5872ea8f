"""Precomputed image embeddings in the engine (the E+P+D path) give the tokens of the pixel
path and the same prefix-cache hashes; an encoder's embeddings read through a real
Mooncake TransferEngine arrive intact."""

from __future__ import annotations

import hashlib

import pytest
import torch

from services.common.proto import worker_pb2 as pb
from tests.conftest import image_bytes as png
from tests.deps import MOONCAKE, require


def greedy():
    from services.engine import SamplingParams

    return SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_vl_model_dir):
    from services.engine import LLM

    return LLM(str(tiny_vl_model_dir), dtype="float32", kv_cache_bytes=1 << 22, block_size=4)


def test_embeds_path_equals_pixel_path_and_shares_the_prefix_cache(llm):
    from services.engine.image_processing import open_images

    data = [png(56, 84, 1), png(40, 70, 2)]
    hashes = [hashlib.sha256(d).hexdigest() for d in data]
    tok = llm.engine.tokenizer
    pad = llm.engine.runner.model.image_token_id
    ids = tok.encode("Look at") + [pad] + tok.encode("and") + [pad] + tok.encode("now")
    mm = {"image": open_images(data), "image_hashes": hashes}
    pixel = llm.generate({"prompt_token_ids": ids, "multi_modal_data": mm}, greedy())[0]

    inputs = llm.engine.image_processor(images=open_images(data), return_tensors="pt")
    embeds = llm.engine.runner.model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
    mm = {
        "image_embeds": embeds,
        "image_grid_thw": inputs["image_grid_thw"],
        "image_hashes": hashes,
    }
    again = llm.generate({"prompt_token_ids": ids, "multi_modal_data": mm}, greedy())[0]
    assert again.outputs[0].token_ids == pixel.outputs[0].token_ids
    # Same hashes: the second run found the first one's blocks in the prefix cache.
    assert again.num_cached_tokens >= 4

    other = {**mm, "image_hashes": [hashlib.sha256(b"x").hexdigest()] * 2}
    fresh = llm.generate({"prompt_token_ids": ids, "multi_modal_data": other}, greedy())[0]
    assert fresh.num_cached_tokens < len(ids) // 2  # only text before the first image


def test_wrong_number_of_embeddings_is_refused(llm):
    pad = llm.engine.runner.model.image_token_id
    mm = {"image_embeds": torch.zeros(3, 64), "image_grid_thw": [[1, 4, 4]],
          "image_hashes": ["0" * 64]}  # fmt: skip
    with pytest.raises(ValueError, match="3 image embeddings for 4"):
        llm.generate({"prompt_token_ids": [5, pad, 6], "multi_modal_data": mm}, greedy())


def test_embedding_handoff_through_mooncake():
    require("mooncake.engine", MOONCAKE)
    from services.common.mooncake_agent import MooncakeAgent, MooncakeConfig, TransferError
    from services.encoder.cache import EncoderCache
    from services.encoder.handoff import EmbeddingFetcher

    encoder, prefill = MooncakeAgent(MooncakeConfig()), MooncakeAgent(MooncakeConfig())
    cache = EncoderCache(1 << 20, encoder.register, encoder.unregister)
    a, b = torch.randn(4, 64), torch.randn(9, 64)
    refs = []
    for key, t in (("a", a), ("b", b)):
        e = cache.put(key, t)
        refs.append(pb.EmbeddingRef(session_id=encoder.session_id, addr=e.addr, nbytes=e.nbytes,
                                    num_tokens=t.shape[0], hidden=64))  # fmt: skip
    got = EmbeddingFetcher(prefill).fetch(refs)
    assert torch.equal(got, torch.cat([a, b]))
    bad = pb.EmbeddingRef(session_id="127.0.0.1:1", addr=1, nbytes=4 * 64, num_tokens=1, hidden=64)
    with pytest.raises(TransferError):
        EmbeddingFetcher(prefill).fetch([bad])


def test_image_loader_falls_back_to_the_bytes(tiny_vl_model_dir):
    """An encoder that cannot be read (gone): the worker encodes the image bytes itself;
    without bytes that is a TransferError (the router retries elsewhere)."""
    require("mooncake.engine", MOONCAKE)
    import asyncio

    from prometheus_client import CollectorRegistry

    from services.common.mooncake_agent import MooncakeAgent, MooncakeConfig, TransferError
    from services.encoder.handoff import EmbeddingFetcher
    from services.encoder.metrics import ImageMetrics
    from services.engine.image_processing import load_image_processor
    from services.worker.image_inputs import ImageLoader

    metrics = ImageMetrics(CollectorRegistry(), "m", "w")
    loader = ImageLoader(
        load_image_processor(str(tiny_vl_model_dir)),
        EmbeddingFetcher(MooncakeAgent(MooncakeConfig())),
        metrics,
        fetch_timeout_s=10,
    )
    data = png(56, 56, 3)
    gone = pb.EmbeddingRef(session_id="127.0.0.1:1", addr=1, nbytes=4 * 64 * 4, num_tokens=4,
                           hidden=64)  # fmt: skip
    image = pb.ImageData(hash=hashlib.sha256(data).hexdigest(), data=data, grid_thw=[1, 4, 4])
    image.embedding.CopyFrom(gone)
    prompt = asyncio.run(loader.prompt([1, 2, 3], [image]))
    assert isinstance(prompt, dict)
    assert prompt["multi_modal_data"]["pixel_values"].shape[0] == 16  # 4x4 patches
    assert metrics.local._value.get() == 1 and metrics.fetched._value.get() == 0
    image.data = b""
    with pytest.raises(TransferError, match="unavailable"):
        asyncio.run(loader.prompt([1, 2, 3], [image]))
    bad = pb.ImageData(hash=image.hash, data=b"junk", grid_thw=[1, 4, 4])
    with pytest.raises(ValueError, match="could not be decoded"):
        asyncio.run(loader.prompt([1, 2, 3], [bad]))
