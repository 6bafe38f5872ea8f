"""The encode role's load signal (images waiting, in the tower, tower time per image) as its
LoadReport carries it to the rebalancer, with a fake engine whose vision tower waits on a gate."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from services.common.proto import worker_pb2 as pb
from services.encoder import role as role_mod
from services.encoder.cache import EncoderCache
from services.encoder.metrics import ImageMetrics

pytestmark = pytest.mark.asyncio
TOKENS = 2  # embeddings per fake image


class GatedEngine:
    """Runs the 'vision tower' only when the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.batches: list[int] = []

    async def call(self, fn):
        await self.gate.wait()
        self.gate.clear()
        return fn(self)


def fake_inputs(images, processor):
    return SimpleNamespace(
        pixel_values=torch.zeros(1, 4), image_grid_thw=torch.tensor([[1, 2, 2]]),
        tokens_per_image=lambda merge: [TOKENS],
    )  # fmt: skip


async def until(pred, what: str) -> None:
    for _ in range(1000):  # 10 s: a loaded 2-core CI box may be slow to run the threads
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def test_backlog_counts_waiting_and_encoding_images(monkeypatch) -> None:
    monkeypatch.setattr(role_mod, "open_images", lambda data: data)
    monkeypatch.setattr(role_mod, "preprocess_images", fake_inputs)

    def tower(engine, pixels, grid):
        engine.batches.append(len(grid))
        return torch.randn(len(grid) * TOKENS, 8)

    monkeypatch.setattr(role_mod, "_tower", tower)
    engine = GatedEngine()
    cache = EncoderCache(1 << 20, lambda a, n: None, lambda a: None)
    enc = role_mod.EncodeRole(
        engine, cache, processor=None, session_id="s", instance_id="e0",  # type: ignore[arg-type]
        metrics=ImageMetrics(CollectorRegistry(), "m", "e0"), merge=2, max_batch_images=2,
    )  # fmt: skip
    try:
        assert (enc.waiting, enc.encoding) == (0, 0)
        calls = [
            asyncio.create_task(
                enc.encode(pb.EncodeRequest(images=[pb.ImageData(hash=f"h{i}", data=b"x")]))
            )
            for i in range(5)
        ]
        # The batch loop starts once all five are queued, so the first batch is two images
        # whatever order the preprocessing threads finish in (under load one image used to
        # be queued, and batched, alone).
        await until(lambda: enc._queue.qsize() == 5, "5 images preprocessed")
        assert (enc.waiting, enc.encoding) == (5, 0)
        enc.start()
        # First batch of two in the tower, three more accepted and waiting.
        await until(lambda: enc.encoding == 2 and enc.waiting == 3, "2 encoding, 3 waiting")
        engine.gate.set()
        await until(lambda: engine.batches == [2] and enc.encoding == 2, "second batch")
        assert enc.waiting == 1
        engine.gate.set()
        await until(lambda: engine.batches == [2, 2] and enc.encoding == 1, "third batch")
        assert enc.waiting == 0
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(*calls), 5)
        assert engine.batches == [2, 2, 1]
        assert (enc.waiting, enc.encoding) == (0, 0)
        assert enc.tower_ms.mean() > 0
    finally:
        await enc.stop()
