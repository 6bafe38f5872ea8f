"""Prefill side of PD: push a request's KV blocks into the decode worker's cache, layer by
layer while the remaining layers compute.

The engine's step thread calls ``on_layer_done`` after every layer; it only appends write
descriptors to a queue (no I/O on the step thread). A sender thread performs the Mooncake
writes in order, so a partly filled block re-sent by a later chunk overwrites the earlier
copy. ``wait`` returns once every write of a finished request has landed.

Writes are grouped: the sender holds queued layers until they add up to ``min_write_bytes``
(the worker's ``--kv-push-min-write-bytes``) or the engine step ends (its last layer), then
writes each request's group with one call.
Over Mooncake's TCP transport a call has a fixed cost of about a millisecond on loopback,
so ~1.5 MB per-layer writes (a 1024-token prompt of the 135M default model) reach about
half the bandwidth of one large write; groups of a few layers keep most of the overlap
with compute and most of the bandwidth. Groups never span two engine steps, so the ranges
in one call are distinct and may land in any order.

The decode worker hands its reserved blocks to other requests once the reservation's deadline
is past, so a push checks its descriptor before any write (``add``) and submits nothing at or
after the deadline (``PushTarget.deadline``; see the NOTE in services/decode/kv_receiver.py
on what that guarantees together with the decode side's quarantine).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.common.mooncake_agent import MooncakeAgent, TransferError
from services.engine.kv_layout import KVLayout, transfer_ranges
from services.engine.kv_staging import KVStaging, StagingFull
from services.engine.scheduler_output import ScheduledSeq

if TYPE_CHECKING:
    from services.engine.speculative.handoff import DraftStates
    from services.engine.speculative.states_push import StatesArena

logger = logging.getLogger(__name__)


@dataclass
class PushTarget:
    """Where one request's KV goes (from the decode worker's reservation)."""

    session: str  # decode worker's Mooncake session ("host:port")
    layout: KVLayout  # decode worker's cache layout
    dst_blocks: list[int]  # decode block for each prompt block, in order
    skip_blocks: int  # leading blocks the decode worker already has (its prefix cache)
    num_tokens: int  # tokens whose KV is pushed (the prompt, and a migrated request's outputs)
    # time.monotonic() at which the reservation may be reclaimed: nothing is written from then on
    deadline: float = math.inf
    sent_tokens: int = 0  # tokens whose KV was queued for every layer
    pending: int = 0  # queued writes not yet done
    error: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    done: threading.Condition = field(default_factory=threading.Condition)
    # Staging slots of the blocks from skip_blocks on (device KV the transfer engine cannot
    # read), given back once the request is over and its queued writes drained.
    slots: list[int] = field(default_factory=list)
    over: bool = False  # waited for or discarded
    # Called once it is over and no queued write still reads its sources (the regions an
    # EAGLE-3 head's states are written from, ``push_states``).
    after: list[Callable[[], None]] = field(default_factory=list)
    request_id: str = ""  # set by KVSender.add


# A queued write: the request's target and its source addresses, destination addresses and
# lengths; or _FLUSH (the engine step ended: write what is held) or None (stop).
_Write = tuple[PushTarget, list[int], list[int], list[int]]
_FLUSH = "flush"

DEFAULT_MIN_WRITE_BYTES = 8 << 20

_PAST_DEADLINE = "KV push stopped: the decode worker's reservation is past its deadline"
_FENCED = "KV push stopped: the decode worker released the reservation (fenced)"
_DELIVERED = (
    "KV push refused: this reservation's KV was already delivered (a duplicate "
    "Prefill); the decode worker may be writing into its blocks"
)
# How long a fenced request id stays refused when the reservation's deadline is unknown.
FENCE_MEMORY_S = 600.0


class KVSender:
    def __init__(
        self,
        agent: MooncakeAgent,
        layout: KVLayout,
        block_size: int,
        min_write_bytes: int = DEFAULT_MIN_WRITE_BYTES,
        staging: KVStaging | None = None,
    ) -> None:
        self.agent = agent
        self.layout = layout
        # With staging, each layer's blocks are copied into host slots and written from there.
        self.staging = staging
        self.source = staging.layout if staging is not None else layout
        # Every write reads the source cache: all of it must be registered memory.
        agent.check_local([self.source.base_addr], [self.source.total_bytes])
        self.block_size = block_size
        self.min_write_bytes = min_write_bytes  # hold queued layers until this many bytes
        self.targets: dict[str, PushTarget] = {}
        # Pushes with writes that may still land (running, or over with writes queued), and
        # fenced request ids (refused until the time given); both under _lock.
        self._pushes: dict[str, PushTarget] = {}
        self._fenced: dict[str, float] = {}
        # Request ids whose push was delivered, refused until their reservation's deadline
        # (see ``wait``); pruned when it doubles in size. Under _lock.
        self._delivered: dict[str, float] = {}
        self._prune_at = 1024
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Write | str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kv-sender", daemon=True)
        self._thread.start()

    def add(self, request_id: str, target: PushTarget) -> None:
        """Start pushing a request's KV into ``target``. TransferError for a descriptor that
        does not fit this worker's cache or addresses blocks outside the decode worker's."""
        self.check(target)
        target.request_id = request_id
        with self._lock:
            if self._fenced.get(request_id, 0.0) > time.monotonic():
                raise TransferError(_FENCED)
            if self._delivered.get(request_id, 0.0) > time.monotonic():
                raise TransferError(_DELIVERED)
            if self.staging is not None:
                blocks = -(-target.num_tokens // self.block_size) - target.skip_blocks
                try:
                    target.slots = self.staging.allocate(max(0, blocks))
                except StagingFull as e:
                    raise TransferError(f"KV staging: {e}") from None
            self.targets[request_id] = target
            self._pushes[request_id] = target

    def fence(self, request_id: str, timeout: float, until_unix: float = 0.0) -> bool:
        """Write nothing more for ``request_id``: its push stops, one added before
        ``until_unix`` (the reservation's deadline, ``time.time()``; 0: unknown) is refused,
        and this returns True once no write of it can still land (False at ``timeout``: ask
        again). The decode worker calls it (FenceKVPush) before it reuses the blocks of a
        reservation released unclaimed. A push added after ``until_unix`` is past its own
        deadline (its clock is this host's too), so a retry under the same id may proceed."""
        end = time.monotonic() + timeout
        with self._lock:
            now = time.monotonic()
            self._fenced = {r: t for r, t in self._fenced.items() if t > now}
            memory = until_unix - time.time() if until_unix else FENCE_MEMORY_S
            self._fenced[request_id] = now + max(0.0, memory)
            t = self._pushes.get(request_id)
        if t is not None:
            t.error = t.error or _FENCED
            with t.done:
                if not t.done.wait_for(lambda: t.pending == 0, timeout):
                    return False
        # A write the agent gave up on may still be running: it lands or fails first.
        while not self.agent.quiesced():
            if time.monotonic() >= end:
                return False
            time.sleep(0.01)
        return True

    def check(self, t: PushTarget) -> None:
        """TransferError unless ``t`` fits this cache and the decode worker's."""
        needed = -(-t.num_tokens // self.block_size)
        try:
            t.layout.check_compatible(self.source)
            t.layout.check_blocks(t.dst_blocks, "reserved block")
            if not 0 <= t.skip_blocks <= needed <= len(t.dst_blocks):
                raise ValueError(
                    f"{len(t.dst_blocks)} blocks ({t.skip_blocks} cached) reserved for a "
                    f"prompt of {needed} blocks"
                )
        except ValueError as e:
            raise TransferError(f"invalid reservation from the decode worker: {e}") from None

    def on_layer_done(self, layer: int, scheduled: list[ScheduledSeq]) -> None:
        """Step thread: queue this layer's newly computed blocks of every PD request."""
        if not self.targets:
            return
        bs = self.block_size
        last_layer = layer == self.layout.num_layers - 1
        for item in scheduled:
            t = self.targets.get(item.seq.request_id)
            if t is None or t.error is not None:
                continue
            if time.monotonic() >= t.deadline:
                t.error = _PAST_DEADLINE
                continue
            seq = item.seq
            end = min(seq.num_computed_tokens + item.num_new_tokens, t.num_tokens)
            # From the first block not yet sent (cached prefill blocks are sent with the first
            # chunk), skipping what the decode side already has.
            first = max(min(t.sent_tokens, seq.num_computed_tokens) // bs, t.skip_blocks)
            last = min((end + bs - 1) // bs, len(t.dst_blocks))
            if last_layer:
                t.sent_tokens = end
            if first >= last:
                continue
            src_blocks = seq.block_table[first:last]
            if self.staging is not None:
                slots = t.slots[first - t.skip_blocks : last - t.skip_blocks]
                self.staging.stage_out(range(layer, layer + 1), src_blocks, slots)
                src_blocks = slots
            srcs, dsts, lens = transfer_ranges(
                self.source, t.layout, src_blocks, t.dst_blocks[first:last], range(layer, layer + 1)
            )
            with t.done:
                t.pending += 1
            self._queue.put((t, srcs, dsts, lens))
        if last_layer:
            self._queue.put(_FLUSH)

    def push_states(
        self, request_id: str, arena: StatesArena, addr: int, states: DraftStates
    ) -> bool:
        """Queue the write of an EAGLE-3 head's states (the rows of ``states``, already in
        the decode worker's form: states_push.py) to the decode worker's ``addr``, after the
        request's KV, on its push: ``wait`` waits for it, and its deadline and ``fence`` stop
        it as they stop the KV. Call after the request's last layer was queued, before
        ``wait``. False (nothing queued) when ``arena`` has no room to write it from."""
        t = self.targets[request_id]
        region = arena.allocate_rows(len(states.tokens))
        if region is None or region.nbytes < len(states.tokens) * arena.row_bytes:
            arena.free(region)
            return False
        try:
            n = arena.put(region, states.hidden)
        except BaseException:
            arena.free(region)
            raise
        with t.done:
            t.after.append(lambda: arena.free(region))
            t.pending += 1
        self._queue.put((t, [arena.addr(region)], [addr], [n]))
        self._queue.put(_FLUSH)
        return True

    def _run(self) -> None:
        held: list[_Write] = []
        held_bytes = 0
        while True:
            item = self._queue.get()
            if item is None:
                self._write(held)
                return
            if isinstance(item, str):  # _FLUSH
                self._write(held)
                held, held_bytes = [], 0
                continue
            held.append(item)
            held_bytes += sum(item[3])
            if held_bytes >= self.min_write_bytes:
                self._write(held)
                held, held_bytes = [], 0

    def _write(self, writes: list[_Write]) -> None:
        """One write call per request for the held writes."""
        by_target: dict[int, list[_Write]] = {}
        for item in writes:
            by_target.setdefault(id(item[0]), []).append(item)
        for items in by_target.values():
            t = items[0][0]
            srcs = [a for it in items for a in it[1]]
            dsts = [a for it in items for a in it[2]]
            lens = [n for it in items for n in it[3]]
            start = time.perf_counter()
            try:
                if t.error is None and time.monotonic() >= t.deadline:
                    t.error = _PAST_DEADLINE
                if t.error is None:
                    self.agent.write(t.session, srcs, dsts, lens, deadline=t.deadline)
                    t.bytes += sum(lens)
            except TransferError as e:
                t.error = str(e)
            except Exception as e:  # noqa: BLE001 - any failure must reach the waiter
                logger.exception("KV push failed")
                t.error = f"KV push failed: {e!r}"
            t.seconds += time.perf_counter() - start
            with t.done:
                t.pending -= len(items)
                t.done.notify_all()
                self._give_back_slots(t)

    def _give_back_slots(self, t: PushTarget) -> None:
        """Forget the push and free its staging slots once it is over and no write still
        reads them (call with ``t.done`` held)."""
        if t.over and t.pending == 0:
            with self._lock:
                self._pushes.pop(t.request_id, None)
            if t.slots and self.staging is not None:
                self.staging.free(t.slots)
                t.slots = []
            after, t.after = t.after, []
            for fn in after:
                fn()

    def wait(self, request_id: str, timeout: float) -> PushTarget:
        """Block until every queued write of the request is done (call after the request
        finished on the engine); raises TransferError on failure, on timeout, or when the
        reservation's deadline comes first."""
        t = self.targets.pop(request_id)
        limit = min(timeout, t.deadline - time.monotonic())
        with t.done:
            if not t.done.wait_for(lambda: t.pending == 0, max(0.0, limit)):
                t.error = t.error or (
                    f"KV push timed out after {timeout:.1f}s"
                    if limit == timeout
                    else _PAST_DEADLINE
                )
            t.over = True
            self._give_back_slots(t)
        if t.error is not None:
            raise TransferError(t.error)
        self._remember_delivered(request_id, t.deadline)
        return t

    def _remember_delivered(self, request_id: str, deadline: float) -> None:
        """NOTE: once its push is delivered, the decode worker may claim the reservation and
        write its own tokens' KV into the same blocks (the last one is shared with the
        prompt): a second push for it (a Prefill sent twice) would overwrite them, and the
        decode would go on from corrupted KV. So it is refused until the reservation's
        deadline, after which that deadline refuses it anyway."""
        now = time.monotonic()
        with self._lock:
            self._delivered[request_id] = min(deadline, now + FENCE_MEMORY_S)
            if len(self._delivered) > self._prune_at:
                self._delivered = {r: t for r, t in self._delivered.items() if t > now}
                self._prune_at = max(1024, 2 * len(self._delivered))

    def discard(self, request_id: str) -> None:
        """Forget a request (aborted before it finished); queued writes still drain."""
        t = self.targets.pop(request_id, None)
        if t is not None:
            t.error = t.error or "aborted"
            with t.done:
                t.over = True
                self._give_back_slots(t)

    def close(self) -> None:
        self._queue.put(None)
