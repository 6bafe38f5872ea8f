"""Encode role of a worker: vision embeddings of images, computed in batches, cached by
content hash and left in registered memory for prefill workers to read (see cache.py).

Concurrent Encode calls meet in one queue; a batch loop takes what is queued (up to
``max_batch_images``) and runs the vision tower once for all of it, on the engine's step
thread (the model lives there). Two calls for the same image share one computation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from services.common.aio import cancel_and_wait
from services.common.latency import LatencyWindow
from services.common.proto import worker_pb2 as pb
from services.common.role import Role
from services.encoder.cache import EncoderCache, Entry
from services.encoder.metrics import ImageMetrics
from services.engine.async_engine import AsyncLLMEngine
from services.engine.image_processing import open_images
from services.engine.llm_engine import LLMEngine
from services.engine.multimodal import ImageInputs, preprocess_images

log = logging.getLogger(__name__)


@dataclass
class _Job:
    key: str  # the image's content hash
    inputs: ImageInputs  # its pixels and grid
    done: asyncio.Future[Entry]


class EncodeRole(Role):
    name = "encode"

    def __init__(
        self,
        engine: AsyncLLMEngine,
        cache: EncoderCache,
        processor: Any,
        session_id: str,
        instance_id: str,
        metrics: ImageMetrics,
        merge: int,
        max_batch_images: int = 16,
    ) -> None:
        self.engine = engine
        self.merge = merge  # the model's spatial merge size (patches per embedding: merge**2)
        self.cache = cache
        self.processor = processor
        self.session_id = session_id
        self.instance_id = instance_id
        self.metrics = metrics
        self.max_batch_images = max_batch_images
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._computing: dict[str, asyncio.Future[Entry]] = {}
        self._task: asyncio.Task[None] | None = None
        self._preparing: set[asyncio.Task[None]] = set()
        self.encoding = 0  # images in the vision-tower batch running now
        self.tower_ms = LatencyWindow()  # vision-tower milliseconds per image, per batch

    @property
    def waiting(self) -> int:
        """Images accepted and not yet in the tower: being decoded, or queued for a batch."""
        return max(len(self._computing) - self.encoding, 0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._batch_loop(), name="encoder-batches")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self.cache.clear()

    async def encode(self, request: pb.EncodeRequest) -> pb.EncodeResponse:
        """References to the embeddings of the request's images. Raises ValueError for an
        image that cannot be decoded, RuntimeError when the engine failed."""
        hits = 0
        entries: list[Entry] = []
        for i, image in enumerate(request.images):
            if not image.hash:
                raise ValueError(f"image {i} has no content hash")
            entry = self.cache.lease(image.hash)
            if entry is not None:
                hits += 1
                self.metrics.cache_hits.inc()
            else:
                self.metrics.cache_misses.inc()
                entry = await asyncio.shield(self._computed(image))
            entries.append(entry)
        return pb.EncodeResponse(embeddings=[self._ref(e) for e in entries], cache_hits=hits)

    def _computed(self, image: pb.ImageData) -> asyncio.Future[Entry]:
        """The future embeddings of an image not in the cache (one computation per image)."""
        fut = self._computing.get(image.hash)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._computing[image.hash] = fut
            task = asyncio.create_task(self._enqueue(image, fut))
            self._preparing.add(task)  # NOTE: a task nobody references may be collected
            task.add_done_callback(self._preparing.discard)
        return fut

    async def _enqueue(self, image: pb.ImageData, fut: asyncio.Future[Entry]) -> None:
        try:
            pil = await asyncio.to_thread(open_images, [image.data])
            inputs = await asyncio.to_thread(preprocess_images, pil, self.processor)
        except Exception as exc:  # noqa: BLE001 - handed to every waiter
            self._computing.pop(image.hash, None)
            fut.set_exception(exc if isinstance(exc, ValueError) else ValueError(str(exc)))
            return
        await self._queue.put(_Job(image.hash, inputs, fut))

    async def _batch_loop(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < self.max_batch_images and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            self.encoding = len(jobs)
            try:
                await self._run_batch(jobs)
            except Exception as exc:  # noqa: BLE001 - the loop serves the next batch anyway
                log.exception("vision tower batch of %d images failed", len(jobs))
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(RuntimeError(f"vision tower failed: {exc}"))
            finally:
                self.encoding = 0
                for job in jobs:
                    self._computing.pop(job.key, None)

    async def _run_batch(self, jobs: list[_Job]) -> None:
        pixels = torch.cat([j.inputs.pixel_values for j in jobs])  # type: ignore[misc]
        grid = torch.cat([j.inputs.image_grid_thw for j in jobs])
        started = time.monotonic()
        embeds = await self.engine.call(lambda e: _tower(e, pixels, grid))
        self.tower_ms.add((time.monotonic() - started) * 1000 / len(jobs))
        self.metrics.tower_images.inc(len(jobs))
        self.metrics.batch_images.observe(len(jobs))
        rows = torch.split(embeds, [j.inputs.tokens_per_image(self.merge)[0] for j in jobs])
        for job, chunk in zip(jobs, rows, strict=True):
            job.done.set_result(self.cache.put(job.key, chunk))

    def _ref(self, entry: Entry) -> pb.EmbeddingRef:
        n, hidden = entry.embeds.shape
        return pb.EmbeddingRef(
            session_id=self.session_id, addr=entry.addr, nbytes=entry.nbytes, num_tokens=n,
            hidden=hidden, encoder_id=self.instance_id,
        )  # fmt: skip


def _tower(engine: LLMEngine, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The vision tower (+ merger) on a batch of images; runs on the engine's step thread."""
    model: Any = engine.runner.model
    return model.encode_images(pixels, grid)
