"""Decode side of PD: reserve blocks for a request's prompt, let the prefill worker write its
KV into them, then start decoding. A reservation nobody completes is freed after a deadline,
so a vanished prefill worker cannot leak blocks."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from services.common.aio import cancel_and_wait
from services.engine.async_engine import AsyncLLMEngine
from services.engine.kv_layout import KVLayout
from services.engine.multimodal import ImageInputs
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Resume

logger = logging.getLogger(__name__)


@dataclass
class Reservation:
    request_id: str
    block_ids: list[int]  # decode block for every prompt block
    cached_tokens: int  # leading tokens already in this worker's prefix cache
    deadline: float  # monotonic time after which the blocks are reclaimed


class KVReceiver:
    def __init__(self, engine: AsyncLLMEngine, layout: KVLayout, reserve_timeout_s: float) -> None:
        self.engine = engine
        self.layout = layout
        self.reserve_timeout_s = reserve_timeout_s
        self.reservations: dict[str, Reservation] = {}
        self.expired = 0  # reservations reclaimed by the deadline (a metric)
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_loop())

    async def stop(self) -> None:
        await cancel_and_wait(self._reaper)

    async def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        resume: Resume | None = None,
        images: ImageInputs | None = None,
    ) -> Reservation:
        """Raises ValueError (bad request) or MemoryError (cache full). ``images``: grids and
        hashes of a vision-language prompt's images."""
        blocks, cached = await self.engine.call(
            lambda e: e.reserve(request_id, prompt_token_ids, params, resume, images)
        )
        r = Reservation(request_id, blocks, cached, time.monotonic() + self.reserve_timeout_s)
        self.reservations[request_id] = r
        return r

    def claim(self, request_id: str) -> Reservation:
        """Take a reservation for decoding (KeyError when it expired or never existed)."""
        return self.reservations.pop(request_id)

    async def release(self, request_id: str) -> None:
        """Free a reservation (the transfer failed, or the router gave up)."""
        if self.reservations.pop(request_id, None) is not None:
            await self.engine.call(lambda e: e.free_reserved(request_id))

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.reserve_timeout_s / 4))
            now = time.monotonic()
            for rid in [r.request_id for r in self.reservations.values() if r.deadline < now]:
                logger.warning("reservation %s expired; freeing its KV blocks", rid)
                self.expired += 1
                try:
                    await self.release(rid)
                except Exception:  # noqa: BLE001 - the loop must survive a dying engine
                    logger.exception("could not free reservation %s", rid)
