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
- That alone is not enough: a process stopped (SIGSTOP, a paused VM, a partition) after it
  submitted a range lands the rest of it when it continues, at any time later. Mooncake's TCP
  server checks a request's address when its header arrives, not its body, and
  mooncake-transfer-engine 0.3.13 cannot cancel a submitted transfer or drop a peer's
  connection. So a reservation released or expired before Decode claimed it keeps the blocks
  the prefill worker writes (or, with staging, its slots) out of every pool until that worker
  answers FenceKVPush: from then on it refuses the request's push and none of its writes is
  still running (Mooncake's TCP protocol v2 acknowledges a write once it has landed). A
  refused connection (the process is gone, its sockets with it) counts as an answer; a
  timeout does not (a stopped or cut-off process looks the same), and the fence is asked
  again until ``fence_timeout_s`` past the deadline.
- Not guaranteed: a writer that stays stopped or cut off longer than ``fence_timeout_s``
  past the deadline, then lands writes it had submitted; the blocks are reused then (a
  bounded leak instead of an unbounded one; the log says which worker). Without a writer
  address (an older router) the wait is ``write_grace_s`` past the deadline instead, which
  covers a running writer's last range, not a stopped one.
- A claimed reservation is freed at once: Prefill returned only after every write landed.
- The region an EAGLE-3 head's states are pushed into (``Reservation.states_region``,
  services/engine/speculative/states_push.py) is written by the same push: it follows the
  blocks, freed at once when claimed, quarantined with them when released unclaimed."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.aio import cancel_and_wait
from services.decode.fence import Fence, WriterGone
from services.engine.async_engine import AsyncLLMEngine
from services.engine.kv_layout import KVLayout
from services.engine.kv_staging import KVStaging, StagingFull
from services.engine.multimodal import ImageInputs
from services.engine.resume import Resume
from services.engine.sampling_params import SamplingParams
from services.engine.speculative.states_push import Region, StatesArena

logger = logging.getLogger(__name__)

# Added to a reservation's window when the request has a structured-output grammar: the
# prefill worker compiles it before it computes and pushes, and a cold worker's first
# compile builds llguidance's tokenizer and token trie inside the window (21.6 s at load
# 14, review4; more under heavier load), which the 30 s default would not leave room for:
# the push then stops at the deadline and the router retries into a second cold build.
# The cost of a longer window is only that a dead writer's blocks come back later.
GRAMMAR_BUILD_ALLOWANCE_S = 60.0


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
    writer: str = ""  # gRPC address of the prefill worker that writes it ("": unknown)
    # Where the prefill worker pushes an EAGLE-3 head's states (None: no head, or no room).
    states_region: Region | None = None


@dataclass
class _Quarantine:
    """Blocks (or staging slots) of a reservation released unclaimed, kept from reuse."""

    request_id: str
    deadline_unix: float  # the reservation's (the writer refuses its push until then)
    until: float  # time.monotonic() from which they are reused even without a fence
    blocks: list[int]  # quarantined in the engine
    slots: list[int]
    fence: asyncio.Task[None] | None = None  # asking the writer to fence its push
    states_region: Region | None = None  # the reservation's, in the receiver's ``states``


FENCE_RETRY_S = 1.0  # between two FenceKVPush calls to a writer that did not answer


class KVReceiver:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        layout: KVLayout,
        reserve_timeout_s: float,
        staging: KVStaging | None = None,
        write_grace_s: float = 10.0,
        fence: Fence | None = None,
        fence_timeout_s: float = 300.0,
        rank_stage_in: Callable[[list[int], list[int]], None] | None = None,
        states: StatesArena | None = None,
    ) -> None:
        """``rank_stage_in``: with staging and tensor parallelism, copies the same slots into
        the same blocks on the other ranks (each holds staging slots of its own, which the
        prefill worker's rank of the same index writes; services/prefill/rank_push.py).
        ``states``: with an EAGLE-3 head, where its states are pushed (a region a reservation)."""
        self.engine = engine
        self.states = states
        self.staging = staging
        self.rank_stage_in = rank_stage_in
        # What prefill workers write into (advertised in every reservation).
        self.layout = staging.layout if staging is not None else layout
        self.reserve_timeout_s = reserve_timeout_s
        # How long past the deadline blocks released unclaimed stay quarantined without a
        # fence: writer unknown, or not answering (see the NOTE above).
        self.write_grace_s = write_grace_s
        self.fence = fence
        self.fence_timeout_s = fence_timeout_s
        self.reservations: dict[str, Reservation] = {}
        self.quarantine: list[_Quarantine] = []
        self.expired = 0  # reservations reclaimed by the deadline (a metric)
        self._reaper: asyncio.Task[None] | None = None
        self._orphans: set[asyncio.Future[None]] = set()  # releases of cancelled Reserves

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_loop())

    async def stop(self) -> None:
        await cancel_and_wait(self._reaper)
        for q in self.quarantine:
            await cancel_and_wait(q.fence)

    async def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        resume: Resume | None = None,
        images: ImageInputs | None = None,
        writer: str = "",
        lora: str = "",
    ) -> Reservation:
        """Raises ValueError (bad request) or MemoryError (cache full). ``images``: grids and
        hashes of a vision-language prompt's images; ``writer``: the gRPC address of the
        prefill worker that will write the blocks (fenced if the reservation is released);
        ``lora``: the request's LoRA adapter ("" none), part of its blocks' hashes.

        NOTE: the engine reserves on its step thread whether or not this call is cancelled
        meanwhile (the router gave up on the request: its client left); a reservation the
        receiver never recorded would hold its blocks forever (the cancellation storm test
        found 2-5 such blocks per run). So the reservation is made and recorded in a
        shielded task, and one whose caller was cancelled is released as soon as it exists.
        """
        await self.engine.prepare(params)
        task = asyncio.ensure_future(
            self._reserve(request_id, prompt_token_ids, params, resume, images, writer, lora)
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(functools.partial(self._release_orphan, request_id))
            raise

    def _release_orphan(self, request_id: str, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None:
            orphan = asyncio.ensure_future(self.release(request_id))
            self._orphans.add(orphan)
            orphan.add_done_callback(self._orphans.discard)

    async def _reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        resume: Resume | None,
        images: ImageInputs | None,
        writer: str,
        lora: str,
    ) -> Reservation:
        blocks, cached = await self.engine.call(
            lambda e: e.reserve(request_id, prompt_token_ids, params, resume, images, lora or None)
        )
        window = self.reserve_timeout_s
        if params.structured_outputs is not None:
            window += GRAMMAR_BUILD_ALLOWANCE_S
        r = Reservation(request_id, blocks, cached, time.monotonic() + window)
        r.deadline_unix = time.time() + window
        r.writer = writer
        r.target_ids = blocks
        if self.staging is not None:
            skip = cached // self.staging.block_size
            try:
                r.slots = self.staging.allocate(len(blocks) - skip)
            except StagingFull as e:
                await self.engine.call(lambda e: e.free_reserved(request_id))
                raise MemoryError(f"KV staging: {e}") from None
            r.target_ids = [0] * skip + r.slots
        if self.states is not None:
            done = len(resume.output_token_ids) if resume is not None else 0
            r.states_region = self.states.allocate_rows(len(prompt_token_ids) + done)
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
        copy = asyncio.ensure_future(asyncio.to_thread(self._stage_in, staging, slots, blocks))
        copy.add_done_callback(lambda _: staging.free(slots))
        await asyncio.shield(copy)

    def _stage_in(self, staging: KVStaging, slots: list[int], blocks: list[int]) -> None:
        staging.stage_in(slots, blocks)
        if self.rank_stage_in is not None:
            self.rank_stage_in(slots, blocks)

    async def release(self, request_id: str) -> None:
        """Free a reservation (the transfer failed, the router gave up, or it expired). The
        prefill worker may still be writing into it: what it writes stays quarantined until
        it fenced its push (see the NOTE above). Shielded: once the reservation is taken out
        of ``reservations``, its blocks must reach the quarantine even if the caller (a
        Release call) is cancelled, or they would be held by no one, forever."""
        r = self.reservations.pop(request_id, None)
        if r is None:
            return
        await asyncio.shield(self._quarantine(request_id, r))

    async def _quarantine(self, request_id: str, r: Reservation) -> None:
        fenced = bool(r.writer) and self.fence is not None
        wait = self.fence_timeout_s if fenced else self.write_grace_s
        q = _Quarantine(
            request_id, r.deadline_unix, max(r.deadline, time.monotonic()) + wait, [], []
        )
        q.states_region, r.states_region = r.states_region, None
        if self.staging is not None:
            q.slots = r.slots
            await self.engine.call(lambda e: e.free_reserved(request_id))
        else:
            q.blocks = await self.engine.call(lambda e: e.free_reserved(request_id, True))
        self.quarantine.append(q)
        if fenced:
            q.fence = asyncio.create_task(self._fence(r.writer, q))

    async def _fence(self, writer: str, q: _Quarantine) -> None:
        assert self.fence is not None
        while True:
            try:
                await self.fence(writer, q.request_id, q.deadline_unix)
                break
            except WriterGone:
                logger.info("reservation %s: its writer %s is gone", q.request_id, writer)
                break
            except Exception as e:  # noqa: BLE001 - not an answer: ask again
                logger.warning(
                    "reservation %s: prefill worker %s did not fence its KV push (%s); %d "
                    "blocks stay quarantined", q.request_id, writer, e, len(q.blocks or q.slots),
                )  # fmt: skip
            await asyncio.sleep(FENCE_RETRY_S)
        q.fence, q.until = None, 0.0
        await self.release_quarantined(time.monotonic())

    async def release_quarantined(self, now: float) -> None:
        """Hand out again the quarantined blocks and slots that were fenced or whose time
        has come."""
        due = [q for q in self.quarantine if q.until <= now]
        if not due:
            return
        self.quarantine = [q for q in self.quarantine if q.until > now]
        for q in due:
            if q.fence is not None:
                logger.error(
                    "reservation %s: no fence from its writer %.0f s past the deadline; its "
                    "blocks are reused", q.request_id, self.fence_timeout_s,
                )  # fmt: skip
                q.fence.cancel()
            if q.slots and self.staging is not None:
                self.staging.free(q.slots)
            if self.states is not None:
                self.states.free(q.states_region)
        blocks = [b for q in due for b in q.blocks]
        if blocks:
            await self.engine.call(lambda e: e.release_quarantined(blocks))

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
