"""Decode side of PD: reserve blocks for a request's prompt, let the prefill worker write its
KV into them, then start decoding. A reservation nobody completes is freed after a deadline,
so a vanished prefill worker cannot leak blocks.

With staging (device KV the transfer engine cannot register), the prefill worker writes into
host staging slots instead, and claiming the reservation copies them into the reserved
device blocks.

NOTE: only a reservation's owner writes its blocks. Who guarantees what:
- The prefill worker writes nothing at or after the reservation's deadline: its sender checks
  it before each write call and before submitting each range to Mooncake
  (services/prefill/kv_sender.py, services/common/mooncake_agent.py). It takes the earlier of
  the decode worker's wall-clock deadline and the relative one counted from the request's
  arrival, so a Prefill request that waited in a stopped process's socket stops too.
- A reservation released or expired before Decode claimed it keeps the blocks the prefill
  worker writes (or, with staging, its slots) out of every pool until its deadline plus
  ``write_grace_s`` (or now plus the grace when that is later): the grace covers a range
  submitted just before the deadline that is still landing (one write call carries at most
  one engine step's layers or the sender's min_write_bytes), the request's transit and the
  clock skew between the two hosts (NTP keeps it far below the grace).
- A claimed reservation is freed at once: Prefill returned only after every write was
  acknowledged, and Mooncake's TCP protocol v2 acknowledges a write once it has landed.
- Not guaranteed: a prefill process stopped (SIGSTOP, a paused VM) after submitting a range
  and before it landed, and resumed later than the grace, still lands the rest of that range:
  Mooncake's TCP server checks a request's address when its header arrives, not its body,
  and mooncake-transfer-engine 0.3.13 has no call to cancel a submitted transfer or drop a
  peer's connection. That residue is at most the ranges of one write call; a process stopped
  anywhere else (computing, holding queued writes, its Prefill still unread) writes nothing
  after resuming. A fence closing it needs the transport: a memory registration per
  reservation (an RDMA key invalidated on release) or a server-side generation check."""

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
    # time.monotonic() after which the blocks are reclaimed; nothing may write them from then on
    deadline: float
    # Where the prefill worker writes, one id per prompt block in ``layout``: the blocks
    # themselves, or with staging the slots (0 for the cached blocks nobody writes).
    target_ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # staging slots, from the first uncached
    deadline_unix: float = 0.0  # ``deadline`` on the wall clock (time.time()), for the peer


class KVReceiver:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        layout: KVLayout,
        reserve_timeout_s: float,
        staging: KVStaging | None = None,
        write_grace_s: float = 10.0,
    ) -> None:
        self.engine = engine
        self.staging = staging
        # What prefill workers write into (advertised in every reservation).
        self.layout = staging.layout if staging is not None else layout
        self.reserve_timeout_s = reserve_timeout_s
        self.write_grace_s = write_grace_s  # quarantine past the deadline (see the NOTE above)
        self.reservations: dict[str, Reservation] = {}
        # Released before being claimed: when the engine's quarantined blocks come due, and
        # the staging slots still kept from reuse (with the time they may be reused).
        self._blocks_due: list[float] = []
        self._slots_due: list[tuple[float, list[int]]] = []
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
        r.deadline_unix = time.time() + self.reserve_timeout_s
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
        """Free a reservation (the transfer failed, the router gave up, or it expired). The
        prefill worker may still be writing into it: what it writes stays quarantined until
        the deadline plus the grace (see the NOTE above)."""
        r = self.reservations.pop(request_id, None)
        if r is None:
            return
        until = max(r.deadline, time.monotonic()) + self.write_grace_s
        if self.staging is not None:
            if r.slots:
                self._slots_due.append((until, r.slots))
            await self.engine.call(lambda e: e.free_reserved(request_id))
        else:
            self._blocks_due.append(until)
            await self.engine.call(lambda e: e.free_reserved(request_id, until))

    async def release_quarantined(self, now: float) -> None:
        """Hand out again the quarantined blocks and slots whose time has come."""
        if self.staging is not None and any(t <= now for t, _ in self._slots_due):
            for _, slots in [d for d in self._slots_due if d[0] <= now]:
                self.staging.free(slots)
            self._slots_due = [d for d in self._slots_due if d[0] > now]
        if any(t <= now for t in self._blocks_due):
            self._blocks_due = [t for t in self._blocks_due if t > now]
            await self.engine.call(lambda e: e.release_quarantined())

    async def _reap_loop(self) -> None:
        tick = max(0.05, min(1.0, self.reserve_timeout_s / 4, self.write_grace_s / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for rid in [r.request_id for r in self.reservations.values() if r.deadline < now]:
                logger.warning("reservation %s expired; freeing its KV blocks", rid)
                self.expired += 1
                try:
                    await self.release(rid)
                except Exception:  # noqa: BLE001 - the loop must survive a dying engine
                    logger.exception("could not free reservation %s", rid)
            try:
                await self.release_quarantined(now)
            except Exception:  # noqa: BLE001 - as above
                logger.exception("could not release quarantined KV blocks")
