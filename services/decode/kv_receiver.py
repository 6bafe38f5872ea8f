"""Decode side of PD: reserve blocks for a request's prompt, let the prefill worker write its
KV into them, then start decoding. A reservation nobody completes is freed after a deadline,
so a vanished prefill worker cannot leak blocks.

With staging (device KV the transfer engine cannot register), the prefill worker writes into
host staging slots instead, and claiming the reservation copies them into the reserved
device blocks."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from services.common.aio import cancel_and_wait
from services.engine.async_engine import AsyncLLMEngine
from services.engine.kv_layout import KVLayout
from services.engine.kv_staging import KVStaging, StagingFull
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
    # Where the prefill worker writes, one id per prompt block in ``layout``: the blocks
    # themselves, or with staging the slots (0 for the cached blocks nobody writes).
    target_ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # staging slots, from the first uncached


class KVReceiver:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        layout: KVLayout,
        reserve_timeout_s: float,
        staging: KVStaging | None = None,
    ) -> None:
        self.engine = engine
        self.staging = staging
        # What prefill workers write into (advertised in every reservation).
        self.layout = staging.layout if staging is not None else layout
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
        await self.engine.prepare(params)
        blocks, cached = await self.engine.call(
            lambda e: e.reserve(request_id, prompt_token_ids, params, resume, images)
        )
        r = Reservation(request_id, blocks, cached, time.monotonic() + self.reserve_timeout_s)
        r.target_ids = blocks
        if self.staging is not None:
            skip = cached // self.staging.block_size
            try:
                r.slots = self.staging.allocate(len(blocks) - skip)
            except StagingFull as e:
                await self.engine.call(lambda e: e.free_reserved(request_id))
                raise MemoryError(f"KV staging: {e}") from None
            r.target_ids = [0] * skip + r.slots
        self.reservations[request_id] = r
        return r

    def claim(self, request_id: str) -> Reservation:
        """Take a reservation for decoding (KeyError when it expired or never made). With
        staging, ``copy_in`` must run before its blocks are read."""
        return self.reservations.pop(request_id)

    async def copy_in(self, r: Reservation) -> None:
        """Copy a claimed reservation's staging slots into its reserved blocks, in a worker
        thread (a request's KV, pinned host -> device: milliseconds the event loop keeps).
        The slots go back when the copy ends, also when the caller is cancelled meanwhile:
        they must not be handed out while the thread still reads them."""
        if self.staging is None or not r.slots:
            return
        staging, slots, r.slots = self.staging, r.slots, []
        blocks = r.block_ids[len(r.block_ids) - len(slots) :]
        copy = asyncio.ensure_future(asyncio.to_thread(staging.stage_in, slots, blocks))
        copy.add_done_callback(lambda _: staging.free(slots))
        await asyncio.shield(copy)

    async def release(self, request_id: str) -> None:
        """Free a reservation (the transfer failed, or the router gave up)."""
        r = self.reservations.pop(request_id, None)
        if r is not None:
            if self.staging is not None and r.slots:
                self.staging.free(r.slots)
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
