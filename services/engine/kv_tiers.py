"""KV-cache tiers below the device: a host-memory block pool and a shared block store.

A device block that holds a cached prefix and is evicted by the block manager's LRU is
copied to the host pool (one batched copy per step, before the step's model run
overwrites it); when the host pool is full, its least recently used blocks spill to the
store (Mooncake Store, see ``services/kvstore/store_tier.py``) from a background thread.
With a store, blocks are also written through to it as soon as they are computed, so that
other workers reuse a prefix while this one still holds it on its device. A prompt whose
prefix misses on the device is matched block by block against the host pool and the
blocks prefetched from the store, and the hits are copied into freshly allocated device
blocks instead of being recomputed.

Store reads never run on the step thread: ``prefetch`` starts a background lookup when a
sequence is queued, and the scheduler admits the sequence once it is done (meanwhile it
schedules others). Store writes are fire-and-forget and dropped when the writer falls
behind: every tier is a cache, so a failure of any kind only means recomputing.

Blocks are keyed by the engine's chained block hashes (image-aware roots included), and
a hit is confirmed by comparing the block's tokens, which travel with its KV. The device
cache is reached through the ``KVCache`` protocol (kv_cache.py; ``ModelRunner`` implements
it), the host pool lives in kv_host_pool.py, and the scheduler hands over its decisions as
``KVLoad`` items (scheduler_output.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from services.engine.block_hash import hash_block
from services.engine.block_manager import KVEvent
from services.engine.kv_host_pool import HostBlockPool
from services.engine.kv_store_format import BlockCodec, StoreTier
from services.engine.scheduler_output import KVLoad, TierHit
from services.engine.tp_host_pool import RankTiers

if TYPE_CHECKING:
    from services.engine.block_manager import BlockManager, CachedBlock
    from services.engine.kv_cache import KVCache
    from services.engine.sequence import Sequence
    from services.engine.tp_ranks import RankProcesses

logger = logging.getLogger(__name__)

# Store writes queued beyond this many batches are dropped (the store is only a cache).
MAX_PENDING_WRITES = 32
# A queued prompt waits at most this long for its store read, then is computed instead;
# while this many reads are unfinished (a slow or sick store), new prompts do not wait.
MAX_FETCH_WAIT_S = 2.0
MAX_PENDING_FETCHES = 8
# On close, store calls still running after this long keep the store client open (closing
# a Mooncake client under a running call crashes; a sick master can hold one for minutes).
CLOSE_WAIT_S = 5.0


# Blocks read from the store for a queued prompt: hash -> (tokens, KV [*block_shape]).
StagedBlocks = dict[int, tuple[tuple[int, ...], torch.Tensor]]


@dataclass
class TierStats:
    host_hit_blocks: int = 0  # blocks loaded from the host pool into the device cache
    store_hit_blocks: int = 0  # blocks loaded from the store into the device cache
    host_saved_blocks: int = 0  # device evictions copied into the host pool
    store_put_blocks: int = 0  # blocks the store accepted
    store_put_failed_blocks: int = 0  # blocks the store refused or that were dropped


class KVTierManager:
    """The tiers below one engine's device cache. Called on the step thread only, except
    for the background store reads and writes it starts itself."""

    def __init__(
        self,
        block_size: int,
        block_shape: tuple[int, ...],
        dtype: torch.dtype,
        host_blocks: int,
        pin_memory: bool,
        store: StoreTier | None = None,
        ranks: RankProcesses | None = None,
    ) -> None:
        """``ranks``: the other tensor-parallel ranks, which follow the host pool's moves with
        their own heads; store values are then whole blocks (tp_host_pool.py)."""
        self.block_size = block_size
        self.group = RankTiers(ranks, block_shape) if ranks is not None else None
        store_shape = self.group.full_shape if self.group is not None else block_shape
        self.codec = BlockCodec(store_shape, dtype, block_size)
        self.host = HostBlockPool(host_blocks, block_shape, dtype, pin_memory)
        self.store: StoreTier | None = None
        if store is not None:
            self.attach_store(store)
        self.stats = TierStats()
        self._events: list[KVEvent] = []
        self._lock = threading.Lock()  # guards _events, stats, _pending_writes, _inflight
        self._pending_writes = 0
        # seq_id -> (the store read of its blocks, when to stop waiting for it)
        self._fetches: dict[int, tuple[Future[StagedBlocks], float]] = {}
        self._reader = ThreadPoolExecutor(2, thread_name_prefix="kv-store-get")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kv-store-put")
        self._fetch_done = threading.Event()
        self._loaded_from_store: set[int] = set()  # this step's store hits: not written back
        self._inflight: set[Future] = set()  # store calls queued or running

    def attach_store(self, store: StoreTier) -> None:
        self.store = store

    def close(self) -> None:
        """Stop the store threads (queued work is dropped) and close the store."""
        self._reader.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            inflight = list(self._inflight)
        _, running = wait(inflight, timeout=CLOSE_WAIT_S)
        if self.store is None:
            return
        if running:
            logger.warning("KV store calls still running at close; leaving the client open")
        else:
            self.store.close()

    def _submit(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Future:
        fut = pool.submit(fn, *args)
        with self._lock:
            self._inflight.add(fut)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: Future) -> None:
        with self._lock:
            self._inflight.discard(fut)

    # ---- lookups (scheduler) ---------------------------------------------------------------

    def prefetch(self, seq: Sequence, hashes: list[int], on_device: Callable[[int], bool]) -> None:
        """Start reading from the store the prompt blocks of ``seq`` (chained ``hashes``)
        that are neither on the device nor in the host pool."""
        if self.store is None or seq.seq_id in self._fetches:
            return
        if sum(not f.done() for f, _ in self._fetches.values()) >= MAX_PENDING_FETCHES:
            return
        first = 0
        while first < len(hashes) and (on_device(hashes[first]) or hashes[first] in self.host):
            first += 1
        if first < len(hashes):
            fut = self._submit(self._reader, self._read_store, hashes[first:])
            fut.add_done_callback(lambda _: self._fetch_done.set())  # once ready() says so
            self._fetches[seq.seq_id] = (fut, time.monotonic() + MAX_FETCH_WAIT_S)

    def ready(self, seq: Sequence) -> bool:
        """False while a store prefetch for ``seq`` is in flight (and not overdue)."""
        entry = self._fetches.get(seq.seq_id)
        return entry is None or entry[0].done() or time.monotonic() > entry[1]

    def wait_for_fetch(self, timeout: float) -> None:
        """Block the (otherwise idle) step thread until some prefetch finishes (or for
        ``timeout`` when one finished between the scheduling and this call)."""
        self._fetch_done.wait(timeout)
        self._fetch_done.clear()

    def match(self, seq: Sequence, first_block: int, parent: int, max_blocks: int) -> list[TierHit]:
        """The prompt blocks ``first_block`` .. ``max_blocks - 1`` of ``seq`` (chained from
        ``parent``) found in the host pool or the prefetched store data, up to the first
        miss."""
        staged = self._staged(seq.seq_id)
        bs = self.block_size
        hits: list[TierHit] = []
        for i in range(first_block, max_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = hash_block(parent, tokens)
            if self.host.lookup(parent, tokens) is not None:
                hits.append(TierHit(parent, tokens, "host"))
            elif parent in staged and staged[parent][0] == tokens:
                hits.append(TierHit(parent, tokens, "store"))
            else:
                break
        return hits

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s prefetched data (admitted without store hits, or finished)."""
        entry = self._fetches.pop(seq.seq_id, None)
        if entry is not None:
            entry[0].cancel()

    def _staged(self, seq_id: int) -> StagedBlocks:
        entry = self._fetches.get(seq_id)
        if entry is None or not entry[0].done() or entry[0].cancelled():
            return {}
        fut = entry[0]
        try:
            return fut.result()
        except Exception:  # noqa: BLE001 - a failed read is a miss
            logger.warning("KV store prefetch failed", exc_info=True)
            return {}

    def _read_store(self, hashes: list[int]) -> StagedBlocks:
        assert self.store is not None
        values = self.store.get_blocks(hashes)
        out: StagedBlocks = {}
        for h, value in zip(hashes, values, strict=False):
            block = self.codec.decode(value)
            if block is None:
                break
            out[h] = block
        return out

    # ---- data movement (engine, around each step) ------------------------------------------

    def before_step(self, loads: list[KVLoad], bm: BlockManager, cache: KVCache) -> None:
        """Copy what the scheduler decided before the model overwrites blocks: read the
        loads' KV from the host pool (or the store's prefetched data), save evicted device
        blocks to the host pool (which may push host blocks out), then fill the loads'
        device blocks. NOTE: the previous step ended with its logits on the CPU, so these
        blocking copies do not wait for model work. With tensor parallelism the other ranks
        then make the same moves with their own heads."""
        slots = [self.host.lookup(x.hit.block_hash, x.hit.token_ids) for x in loads]
        data = self.gather(loads) if loads else None
        evicted = self.filter_new(bm.take_evicted())
        if evicted:
            kv = cache.read_blocks([e.block_id for e in evicted])  # [2, L, n, ...]
            self.save(evicted, kv.permute(2, 0, 1, 3, 4, 5))
        if data is not None:
            cache.write_blocks([x.block_id for x in loads], data.permute(1, 2, 0, 3, 4, 5))
        if self.group is not None and (loads or evicted):
            spilled = self.group.follow(self.host, loads, slots, evicted)
            if spilled:
                self._write_store(spilled)

    def after_step(self, bm: BlockManager, cache: KVCache) -> None:
        """Write the blocks the step completed through to the store (read now: the
        logits' copy to the CPU waited for the model run)."""
        blocks = [
            b
            for b in self.to_write_through(bm.take_registered())
            if bm.blocks[b.block_id].block_hash == b.block_hash  # still holds that block
        ]
        if blocks:
            kv = cache.read_blocks([b.block_id for b in blocks])
            if self.group is not None:
                kv = self.group.whole([b.block_id for b in blocks], kv)
            self.write_through(blocks, kv.permute(2, 0, 1, 3, 4, 5))

    def gather(self, loads: list[KVLoad]) -> torch.Tensor:
        """KV of the loads' blocks, [n, *block_shape] on the CPU. Read before ``save``
        may push the same host slots out."""
        parts: list[torch.Tensor] = []
        for load in loads:
            hit = load.hit
            if hit.tier == "host":
                slot = self.host.lookup(hit.block_hash, hit.token_ids)
                assert slot is not None, "host hit vanished before its load"
                parts.append(self.host.data[slot])
                self.stats.host_hit_blocks += 1
            else:
                kv = self._staged(load.seq_id)[hit.block_hash][1]
                parts.append(kv if self.group is None else self.group.keep(load.block_id, kv))
                self.stats.store_hit_blocks += 1
                self._loaded_from_store.add(hit.block_hash)
        for seq_id in {load.seq_id for load in loads if load.hit.tier == "store"}:
            self._fetches.pop(seq_id, None)  # admitted: its prefetched data is used up
        return torch.stack(parts)

    def filter_new(self, evicted: list[CachedBlock]) -> list[CachedBlock]:
        """The evicted blocks the host pool does not hold yet (those it does are touched)."""
        fresh = []
        for e in evicted:
            if self.host.lookup(e.block_hash, e.token_ids) is None:
                fresh.append(e)
        return fresh

    def save(self, evicted: list[CachedBlock], data: torch.Tensor) -> None:
        """Keep evicted device blocks (``data``: their KV, [n, *block_shape]) in the host
        pool; what it pushes out goes to the store."""
        hashes = [e.block_hash for e in evicted]
        tokens = [e.token_ids for e in evicted]
        added, spilled = self.host.put(hashes, tokens, data)
        with self._lock:
            self.stats.host_saved_blocks += len(added)
            if added:
                self._events.append(KVEvent("stored", added, tier="host"))
            new = set(hashes)  # the others were pushed out of the pool
            removed = [h for h, _, _ in spilled if h not in new]
            if removed:
                self._events.append(KVEvent("removed", removed, tier="host"))
        if spilled and self.store is not None:
            if self.group is None:
                self._write_store(spilled)
            else:  # written whole once the other ranks sent their heads (follow)
                self.group.spill(spilled, self.host.spilled_slots, evicted)

    def to_write_through(self, registered: list[CachedBlock]) -> list[CachedBlock]:
        """Of the blocks just registered in the device cache, those to copy to the store
        now (write-through: other workers can reuse a prefix while this one still holds
        it); not the ones that came from the store."""
        loaded, self._loaded_from_store = self._loaded_from_store, set()
        if self.store is None:
            return []
        return [b for b in registered if b.block_hash not in loaded]

    def write_through(self, blocks: list[CachedBlock], data: torch.Tensor) -> None:
        """Queue store writes of ``blocks`` (``data``: their KV, [n, *block_shape])."""
        self._write_store([(b.block_hash, b.token_ids, data[i]) for i, b in enumerate(blocks)])

    def _write_store(self, blocks: list[tuple[int, tuple[int, ...], torch.Tensor]]) -> None:
        """Queue a store write. NOTE: the tensors are copies nobody else writes (gathered
        from the device or out of the host pool), so the writer thread encodes them."""
        with self._lock:
            if self._pending_writes >= MAX_PENDING_WRITES:
                self.stats.store_put_failed_blocks += len(blocks)
                return
            self._pending_writes += 1
        self._submit(self._writer, self._put, blocks)

    def _put(self, blocks: list[tuple[int, tuple[int, ...], torch.Tensor]]) -> None:
        assert self.store is not None
        hashes = [h for h, _, _ in blocks]
        stored: list[int] = []
        try:
            values = [self.codec.encode(kv, t) for _, t, kv in blocks]
            stored = self.store.put_blocks(hashes, values)
        except Exception:  # noqa: BLE001 - the store is a cache: log and go on
            logger.warning("KV store write failed", exc_info=True)
        with self._lock:
            self._pending_writes -= 1
            self.stats.store_put_blocks += len(stored)
            self.stats.store_put_failed_blocks += len(hashes) - len(stored)
            if stored:
                self._events.append(KVEvent("stored", stored, tier="store"))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for the store writes queued so far (tests, shutdown)."""
        self._writer.submit(lambda: None).result(timeout)

    def stats_fields(self) -> dict[str, int]:
        """This manager's part of EngineStats."""
        with self._lock:
            st = self.stats
            return {
                "kv_host_hit_blocks": st.host_hit_blocks,
                "kv_store_hit_blocks": st.store_hit_blocks,
                "kv_host_blocks_used": len(self.host),
                "kv_host_blocks_total": self.host.num_blocks,
                "kv_store_put_blocks": st.store_put_blocks,
            }

    def take_events(self) -> list[KVEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events
