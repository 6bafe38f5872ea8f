"""Continuous-batching scheduler: which sequences run in the next step, and how many tokens each."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import takewhile

from services.engine.block_manager import BlockManager, ComputedBlocks, chain_root
from services.engine.kv_tiers import KVLoad, KVTierManager, TierHit
from services.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on
    # The step reaches the sequence's last token, so it samples the next one. Fixed when
    # scheduled (postprocess advances num_computed_tokens afterwards).
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Device blocks to fill from the host pool or the store before the model runs.
    loads: list[KVLoad] = field(default_factory=list)
    # Waiting sequences passed over because their blocks are still coming from the store.
    num_awaiting_store: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        tiers: KVTierManager | None = None,
    ) -> None:
        self.bm = block_manager
        self.tiers = tiers  # host pool / store below the device cache, if any
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Preempted sequences waiting to be recomputed: their prefix-cache lookup on
        # rescheduling finds their own blocks, which is not a hit of the prompt.
        self._recomputing: set[int] = set()

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {seq.num_tokens} tokens; the model's context is {self.max_model_len}"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        if self.tiers is not None:
            self.tiers.prefetch(seq, self.bm.prompt_block_hashes(seq), self.bm.is_cached)

    def add_computed(self, seq: Sequence) -> None:
        """Queue ``seq``, whose KV is already in its blocks (a PD decode request whose prompt
        was imported), for a running slot: ahead of the queued sequences that hold no blocks,
        behind the others like it. NOTE: the queue keeps the sequences holding blocks at its
        front, so they run (and free their blocks) before any that would have to allocate."""
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(self._num_queued_with_blocks(), seq)

    def _num_queued_with_blocks(self) -> int:
        return sum(1 for _ in takewhile(lambda s: s.block_table, self.waiting))

    def fits_empty_cache(self, seq: Sequence) -> bool:
        """Whether ``seq`` and the token it samples next fit in the whole KV cache."""
        return self.bm.blocks_needed(seq.num_tokens + 1) <= self.bm.num_blocks

    @property
    def num_blocks_held_elsewhere(self) -> int:
        """Blocks in use by no running or queued sequence: finished prefills awaiting their
        KV push, decode reservations awaiting their KV, blocks kept from reuse. Their owners
        give them back without a step of this scheduler."""
        mine = {b for s in (*self.running, *self.waiting) for b in s.block_table}
        return self.bm.num_blocks - self.bm.num_free_blocks - len(mine)

    def preempt_queued(self) -> bool:
        """Free the blocks of the newest queued sequence holding any (it is recomputed
        when its turn comes); False when none does."""
        n = self._num_queued_with_blocks()
        if n == 0:
            return False
        seq = self.waiting[n - 1]  # stays where it is: first of those holding no blocks
        self.bm.free(seq)
        self._recomputing.add(seq.seq_id)
        self.num_preemptions += 1
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting_prompt_tokens(self) -> int:
        return sum(s.num_uncomputed_tokens for s in self.waiting)

    def schedule(self) -> SchedulerOutput:
        """One step's batch.

        1. Running sequences first, oldest first (decode-first: a decode costs one token of
           the budget). Each gets what it still needs, capped by the remaining budget. When
           the KV cache cannot hold a sequence's next tokens, the newest running sequence is
           preempted (its blocks freed; it is recomputed later, reusing cached blocks) until
           it fits, or the sequence preempts itself.
        2. Then waiting sequences in arrival order, while the budget, ``max_num_seqs`` and
           the cache allow: look up the prefix cache, take the cached blocks, extend the hit
           with blocks of the host pool or the store (copied into new device blocks before
           the step runs: ``loads``), and schedule the rest of the prompt, chunked to the
           remaining budget. A sequence whose blocks are still being read from the store
           is passed over until they arrive.
        """
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[int] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.bm.allocate_slots(seq, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                scheduled_ids.add(seq.seq_id)
                budget -= n
                i += 1
                continue
            # seq preempted itself; the list shrank, so do not advance i.

        if not out.preempted:
            bs = self.bm.block_size
            i = 0
            while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[i]
                first = not seq.block_table
                if first and self.tiers is not None and not self.tiers.ready(seq):
                    out.num_awaiting_store += 1
                    i += 1
                    continue
                computed = self.bm.get_computed_blocks(seq) if first else None
                hits = self._tier_hits(seq, computed) if computed is not None else []
                cached = (computed.num_blocks + len(hits)) * bs if computed else 0
                start = max(seq.num_computed_tokens, cached)
                n = min(seq.num_tokens - start, budget)
                if not self.bm.allocate_slots(seq, len(hits) * bs + n, computed):
                    break
                if computed is not None and self.tiers is not None:
                    self._load(seq, computed.num_blocks, hits, out)
                if seq.seq_id in self._recomputing:
                    self._recomputing.discard(seq.seq_id)
                elif first and seq.num_output_tokens == 0:
                    self.bm.note_lookup(seq, seq.num_computed_tokens)
                del self.waiting[i]
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        return out

    def allocate_imported(self, seq: Sequence) -> list[KVLoad] | None:
        """Blocks for every token of ``seq``, whose KV is written from elsewhere (the decode
        side of PD): the device prefix-cache hit, extended with host-pool blocks counted as
        computed (their KV is copied in by the returned loads, before the import), then
        fresh blocks for the rest. Returns None, changing nothing, when the cache is full.
        NOTE: host-pool hits only: store reads run in the background (``prefetch``), and a
        reservation, answered at once, cannot wait for one."""
        computed = self.bm.get_computed_blocks(seq)
        hits = list(takewhile(lambda h: h.tier == "host", self._tier_hits(seq, computed)))
        num_new = seq.num_tokens - computed.num_blocks * self.bm.block_size
        if not self.bm.allocate_slots(seq, num_new, computed):
            return None
        out = SchedulerOutput()
        if self.tiers is not None:
            self._load(seq, computed.num_blocks, hits, out)
        return out.loads

    def _tier_hits(self, seq: Sequence, computed: ComputedBlocks) -> list[TierHit]:
        """Blocks after the device hit found in the host pool or the store (the last
        prompt token is always computed: its step samples)."""
        if self.tiers is None or not self.bm.enable_prefix_caching:
            return []
        parent = computed.block_hashes[-1] if computed.block_hashes else chain_root(seq)
        max_blocks = (seq.num_tokens - 1) // self.bm.block_size
        return self.tiers.match(seq, computed.num_blocks, parent, max_blocks)

    def _load(self, seq: Sequence, first: int, hits: list[TierHit], out: SchedulerOutput) -> None:
        """Count the tier hits of a just-allocated ``seq`` as computed and ask for their
        KV to be copied into its blocks ``first``, ``first + 1``, ..."""
        assert self.tiers is not None
        out.loads.extend(
            KVLoad(seq.block_table[first + j], seq.seq_id, hit) for j, hit in enumerate(hits)
        )
        seq.num_computed_tokens += len(hits) * self.bm.block_size
        self.bm.cache_full_blocks(seq)
        if not any(hit.tier == "store" for hit in hits):
            self.tiers.release(seq)  # no prefetched data needed (with it: after the copy)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(self._num_queued_with_blocks(), seq)
        self._recomputing.add(seq.seq_id)
        out.preempted.append(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        self.num_preemptions += 1

    def postprocess(self, out: SchedulerOutput) -> None:
        """Advance computed-token counters after a step and register newly full blocks."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.bm.cache_full_blocks(item.seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark ``seq`` finished and release its blocks (from either queue)."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        self._recomputing.discard(seq.seq_id)
        if self.tiers is not None:
            self.tiers.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
