"""Images of a request as a vision-language worker's engine takes them.

A prefill or mixed worker gets each image's encoded bytes and, in E+P+D mode, a reference to
the embeddings an encoder computed. With references for every image it reads them through
Mooncake (the vision tower is skipped); otherwise, or when an encoder cannot be read any
more, it decodes and preprocesses the images and the engine runs the tower (EP+D). Either
way the images are named by the router's content hashes, so prefix-cache hashes agree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import torch

from services.common.mooncake_agent import TransferError
from services.common.proto import worker_pb2 as pb
from services.encoder.handoff import EmbeddingFetcher
from services.encoder.metrics import ImageMetrics
from services.engine.image_processing import open_images
from services.engine.multimodal import preprocess_images

log = logging.getLogger(__name__)


class ImageLoader:
    def __init__(
        self,
        processor: Any,
        fetcher: EmbeddingFetcher | None,
        metrics: ImageMetrics,
        fetch_timeout_s: float,
    ) -> None:
        self.processor = processor
        self.fetcher = fetcher
        self.metrics = metrics
        self.fetch_timeout_s = fetch_timeout_s

    async def prompt(
        self, ids: list[int], images: Sequence[pb.ImageData]
    ) -> list[int] | dict[str, Any]:
        """The engine prompt for ``ids`` (placeholders expanded by the router) and its
        images. Raises ValueError (bad images) or TransferError (embeddings unreadable and
        no bytes to encode instead)."""
        if not images:
            return ids
        grid = [list(i.grid_thw) for i in images]
        mm: dict[str, Any] = {"image_grid_thw": grid, "image_hashes": [i.hash for i in images]}
        if self.fetcher is not None and all(i.HasField("embedding") for i in images):
            try:
                mm["image_embeds"] = await self._fetch([i.embedding for i in images])
                self.metrics.fetched.inc(len(images))
                return {"prompt_token_ids": ids, "multi_modal_data": mm}
            except (TransferError, TimeoutError) as exc:
                if not all(i.data for i in images):
                    raise TransferError(f"image embeddings unavailable: {exc}") from None
                log.warning("could not read image embeddings (%s); encoding here", exc)
        if not all(i.data for i in images):
            raise ValueError("an image has neither bytes nor an embedding reference")
        pil = await asyncio.to_thread(open_images, [i.data for i in images])
        inputs = await asyncio.to_thread(preprocess_images, pil, self.processor)
        if inputs.image_grid_thw.tolist() != grid:
            raise ValueError(
                f"image grids {inputs.image_grid_thw.tolist()} differ from the router's {grid}: "
                "router and worker must use the same model folder"
            )
        self.metrics.local.inc(len(images))
        mm["pixel_values"] = inputs.pixel_values
        return {"prompt_token_ids": ids, "multi_modal_data": mm}

    async def _fetch(self, refs: list[pb.EmbeddingRef]) -> torch.Tensor:
        assert self.fetcher is not None
        # NOTE: a read that outlives the timeout finishes in its thread, unobserved.
        return await asyncio.wait_for(
            asyncio.to_thread(self.fetcher.fetch, refs), self.fetch_timeout_s
        )
