"""The scheduler's part for sequences whose KV moves between workers (PD): a decode
reservation's blocks allocated for KV written from elsewhere (the prefix cache and host pool
hits counted first), its queueing once the KV is in, and the prefill side's finished sequences
whose blocks stay until their KV is exported. ``Scheduler`` (scheduler.py) inherits it; it
owns the queues and the block manager this changes."""

from __future__ import annotations

from collections import deque
from itertools import takewhile
from typing import TYPE_CHECKING

from services.engine.scheduler_output import KVLoad, SchedulerOutput
from services.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from services.engine.block_manager import BlockManager, ComputedBlocks
    from services.engine.kv_tiers import KVTierManager
    from services.engine.scheduler_output import TierHit
    from services.engine.tier_policy import TierPolicy


class ImportedKV:
    """Scheduler methods for KV written from elsewhere or kept for export (PD)."""

    bm: BlockManager
    tiers: KVTierManager | None
    policy: TierPolicy
    max_num_seqs: int
    waiting: deque[Sequence]
    running: list[Sequence]

    if TYPE_CHECKING:  # the scheduler's, used here

        def _num_queued_with_blocks(self) -> int: ...
        def _ranks(self) -> dict[int, int]: ...
        def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None: ...
        def preempt_queued(self, worse_than: int | None = None) -> bool: ...
        def _tier_hits(self, seq: Sequence, computed: ComputedBlocks) -> list[TierHit]: ...
        def _load(
            self, seq: Sequence, first: int, hits: list[TierHit], out: SchedulerOutput
        ) -> None: ...

    def add_computed(self, seq: Sequence) -> None:
        """Queue ``seq``, whose KV is already in its blocks (a PD decode request whose prompt
        was imported), for a running slot: ahead of the queued sequences that hold no blocks,
        behind the others like it. NOTE: the queue keeps the sequences holding blocks at its
        front, so they run (and free their blocks) before any that would have to allocate."""
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(self._num_queued_with_blocks(), seq)

    def allocate_imported(self, seq: Sequence) -> list[KVLoad] | None:
        """Blocks for every token of ``seq``, whose KV is written from elsewhere (the decode
        side of PD): the device prefix-cache hit, extended with host-pool blocks counted as
        computed (their KV is copied in by the returned loads, before the import), then
        fresh blocks for the rest. Returns None, changing nothing, when the cache is full.
        NOTE: host-pool hits only: store reads run in the background (``prefetch``), and a
        reservation, answered at once, cannot wait for one."""
        while True:
            computed = self.bm.get_computed_blocks(seq)
            hits = list(takewhile(lambda h: h.tier == "host", self._tier_hits(seq, computed)))
            num_new = seq.num_tokens - computed.num_blocks * self.bm.block_size
            if self.bm.allocate_slots(seq, num_new, computed):
                break
            if not self._preempt_for(seq):
                return None
        out = SchedulerOutput()
        if self.tiers is not None:
            self._load(seq, computed.num_blocks, hits, out)
        return out.loads

    def _preempt_for(self, seq: Sequence) -> bool:
        """Free the blocks of one sequence of a worse rank than ``seq`` (in no queue yet): the
        worst running one, else the worst queued one holding blocks; False if there is none."""
        rank = self.policy.rank_on_arrival(seq)
        victim = self.policy.worst(self.running, self._ranks(), worse_than=rank)
        if victim is not None:
            self._preempt(victim, SchedulerOutput())
            return True
        return self.preempt_queued(worse_than=rank)

    def start_computed(self, seq: Sequence) -> None:
        """Run ``seq``, whose KV is already in its blocks (a claimed PD reservation), in the
        next step; without a free running slot, queue it with ``add_computed``."""
        if len(self.running) < self.max_num_seqs:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:
            self.add_computed(seq)

    def finish_keeping_blocks(
        self, seq: Sequence, reason: str, stop_reason: str | int | None = None
    ) -> None:
        """Mark the running ``seq`` finished and take it out of the batch without freeing its
        blocks: their KV awaits export (the prefill side of PD); the caller frees them."""
        self.running.remove(seq)
        self.policy.finished(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def free(self, seq: Sequence) -> None:
        """Release the blocks of ``seq``, which is in neither queue (a finished prefill
        whose KV was exported, a dropped decode reservation)."""
        self.bm.free(seq)

    def free_quarantined(self, seq: Sequence) -> list[int]:
        """``free`` for a dropped reservation a peer may still write into: the blocks after
        its prefix-cache hit leave every pool until ``release_quarantined``. Returns them."""
        return self.bm.free_quarantined(seq, seq.num_cached_tokens // self.bm.block_size)

    def release_quarantined(self, block_ids: list[int]) -> None:
        """Return blocks of ``free_quarantined`` to the free pool."""
        self.bm.release_quarantined(block_ids)

    def note_imported_lookup(self, seq: Sequence) -> None:
        """Count a reservation's prefix-cache hit (its tokens computed after
        ``allocate_imported``) in the hit-rate statistics."""
        self.bm.note_lookup(seq, seq.num_computed_tokens)

    def mark_imported(self, seq: Sequence) -> None:
        """The blocks of ``seq`` (in neither queue) now hold the KV of all its tokens,
        written from elsewhere: count them computed and register its full blocks."""
        seq.num_computed_tokens = seq.num_tokens
        self.bm.cache_full_blocks(seq)
