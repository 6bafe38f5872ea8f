"""Continuous-batching scheduler: which sequences run in the next step, and how many tokens each.

Pure Python (no torch, no model): it owns the queues (``waiting``, ``running``) and is the
only code that changes them, and it makes every change to its block manager's allocations;
callers use its methods. It hands each step's decisions over as a ``SchedulerOutput``
(scheduler_output.py) that the model runner and the KV tiers read.

Service tiers (service_tiers.py) order both queues and pick preemption victims (see
``schedule``). A preempted sequence is recomputed: its full blocks stay in the prefix cache
and, with the host pool on, move there when evicted, so the recompute mostly copies them.

Where the coming features plug in:
- tensor parallelism: nothing here; one schedule drives every rank (model_runner.py).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from itertools import takewhile
from typing import TYPE_CHECKING

from services.engine.block_manager import BlockManager, ComputedBlocks, chain_root
from services.engine.scheduler_output import KVLoad, ScheduledSeq, SchedulerOutput, TierHit
from services.engine.scheduler_pd import ImportedKV
from services.engine.sequence import Sequence, SequenceStatus, prefill_tokens_left
from services.engine.service_tiers import DEFAULT_OFFLINE_AGING_S, SERVICE_TIERS
from services.engine.tier_policy import OFFLINE_RANK, TierPolicy

if TYPE_CHECKING:
    from services.engine.kv_tiers import KVTierManager
    from services.engine.speculative.speculator import Speculator

# With max_prefill_tokens_while_decoding, the running decodes per prompt from which a step's
# prompt tokens are capped (Scheduler._prefill_cap says why so many).
DECODES_PER_CAPPED_PROMPT = 8


class Scheduler(ImportedKV):
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        tiers: KVTierManager | None = None,
        offline_aging_s: float = DEFAULT_OFFLINE_AGING_S,
        max_offline_batched_tokens: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        offline_step_share: float | None = None,
        offline_tpot_quantile: float | None = None,
        max_prefill_tokens_while_decoding: int = 0,
    ) -> None:
        self.bm = block_manager
        self.speculator: Speculator | None = None  # drafts for decodes (speculative/)
        self.tiers = tiers  # host pool / store below the device cache, if any
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Prompt tokens a step may compute beside many decodes (0: no cap; _prefill_cap).
        self.max_prefill_tokens_while_decoding = max_prefill_tokens_while_decoding
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.preemptions_by_tier = dict.fromkeys(SERVICE_TIERS, 0)
        self.policy = TierPolicy(offline_aging_s, max_offline_batched_tokens, clock,
                                 offline_step_share, offline_tpot_quantile)  # fmt: skip
        self._step_started = 0.0  # when the last schedule() returned (on policy.clock)
        # Preempted sequences waiting to be recomputed: their prefix-cache lookup on
        # rescheduling finds their own blocks, which is not a hit of the prompt.
        self._recomputing: set[int] = set()

    def attach_tiers(self, tiers: KVTierManager) -> None:
        """Look prompts up in ``tiers`` (host pool, store) below the device cache, and have
        the block manager record the blocks it evicts and registers for them."""
        self.tiers = tiers
        self.bm.feed_tiers = True

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {seq.num_tokens} tokens; the model's context is {self.max_model_len}"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        if self.tiers is not None:
            self.tiers.prefetch(seq, self.bm.prompt_block_hashes(seq), self.bm.is_cached)

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

    def preempt_queued(self, worse_than: int | None = None) -> bool:
        """Free the blocks of the worst, newest queued sequence holding any (recomputed in its
        turn), only of a rank worse than ``worse_than`` if given; False if none qualifies."""
        holders = [s for s in self.waiting if s.block_table]
        seq = self.policy.worst(holders, self._ranks(), worse_than)
        if seq is None:
            return False
        self.bm.free(seq)  # it stays queued; the next sort puts it behind the holders
        self._recomputing.add(seq.seq_id)
        self._count_preemption(seq)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting_prompt_tokens(self) -> int:
        """Prompt tokens still to compute: waiting, or running a chunked prefill."""
        return prefill_tokens_left(self.waiting, self.running)

    def schedule(self) -> SchedulerOutput:
        """One step's batch.

        0. Rank every sequence (its tier; a flex one aged after ``offline_aging_s``
           without a step goes before the other flex ones: tier_policy.py); sort the running ones by (rank, priority), stably, and the
           queue by (rank, holding blocks first, priority, arrival). Then, per rank, best first
           (offline work, the aged flex sequences then the others, gets at most
           ``max_offline_batched_tokens`` and, with online work in the engine, its
           ``offline_step_share`` of the step's cost, or its pace: tier_policy.py):
        1. Its running sequences (decode-first: a decode costs one token of the budget).
           Each gets what it still needs, capped by the remaining budget. When the KV cache
           cannot hold a sequence's next tokens, the worst-ranked, newest running sequence
           is preempted (its blocks freed; it is recomputed later, reusing cached blocks)
           until it fits, or the sequence preempts itself. After such a preemption no
           waiting sequence is admitted in this step.
        2. Its waiting sequences, while the budget allows: look up the prefix cache, take the
           cached blocks, extend the hit with blocks of the host pool or the store (copied
           into new device blocks before the step runs: ``loads``), and schedule the rest of
           the prompt, chunked to the remaining budget. Short of a running slot or of blocks,
           it preempts running sequences of a worse rank; when none is left, admission stops
           for every rank (the head of the line waits). A sequence whose blocks are still
           being read from the store is passed over until they arrive.
        Prompt tokens (new prompts, chunked prefills, recomputes) take at most
        ``max_prefill_tokens_while_decoding`` of the budget while many running sequences
        decode per prompt (``_prefill_cap``): a prompt beside a full batch of decodes is
        chunked over several short steps, not one long one that every decode waits for.
        3. When this runs nothing, ``resolve_stall`` (the engine calls it next) decides
           whether the queue's head waits for blocks, frees a queued sequence's or ends.
        """
        out = SchedulerOutput()
        ranks = self._ranks()
        self.running.sort(key=lambda s: self.policy.key(s, ranks))
        self.waiting = deque(sorted(self.waiting, key=lambda s: (
            ranks[s.seq_id], not s.block_table, s.params.priority, s.arrival_time)))  # fmt: skip
        self._budget = self.max_num_batched_tokens
        self._prefill_left = self._prefill_cap()
        if self.speculator is not None:
            self.speculator.new_step()
        admit_below = math.inf  # ranks admitted from the queue in this step
        online = min(ranks.values(), default=OFFLINE_RANK) < OFFLINE_RANK
        offline_budget_set = False
        for rank in sorted(set(ranks.values())):
            if rank >= OFFLINE_RANK and not offline_budget_set:  # the offline ranks share it
                used = self.max_num_batched_tokens - self._budget  # by online work
                self._budget = self.policy.offline_budget(self._budget, used, online, self.running)
                offline_budget_set = True
            if self._schedule_running(rank, ranks, out):
                admit_below = -1  # memory pressure: admit nothing more this step
            if rank < admit_below:
                admit_below = min(admit_below, self._schedule_waiting(rank, ranks, out))
        self._step_started = self.policy.start_step()  # postprocess times the step
        return out

    def _ranks(self) -> dict[int, int]:
        return self.policy.ranks((*self.running, *self.waiting))

    def _prefill_cap(self) -> int:
        """Prompt tokens this step may compute: ``max_prefill_tokens_while_decoding`` while
        at least ``DECODES_PER_CAPPED_PROMPT`` running sequences decode per prompt (waiting,
        or running a chunked prefill), else the whole budget.

        NOTE: every decode in a step waits for its prompt tokens, so a 128-token prompt
        beside 15 decodes lengthens 15 inter-token gaps by its whole cost (the served ITL
        tail: benchmarks/RESULTS.md, itl10); chunked, it lengthens them by a chunk's a step.
        Only a few prompts beside many decodes are capped: capping whenever decodes
        outnumbered prompts chunked half-waves too, which then ended, and came back, one by
        one: most steps carried prompt tokens (half of a served row's), and TPOT p50 rose by a
        third and throughput fell 4-6 % in benchmarks/serving_sim.py. A wave at an idle
        engine, or beside a few stragglers, runs in one step."""
        cap = self.max_prefill_tokens_while_decoding
        if not cap:
            return self.max_num_batched_tokens
        decodes = sum(1 for s in self.running if not s.in_prefill)
        prompts = len(self.waiting) + len(self.running) - decodes
        if decodes >= DECODES_PER_CAPPED_PROMPT * max(prompts, 1):
            return cap
        return self.max_num_batched_tokens

    def _schedule_running(self, rank: int, ranks: dict[int, int], out: SchedulerOutput) -> bool:
        """Step 1 of ``schedule`` for the running sequences of ``rank``; True if it preempted."""
        preempted = False
        for seq in [s for s in self.running if ranks[s.seq_id] == rank]:
            if self._budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted for an earlier one in this loop
            spec, n = self.speculator, min(seq.num_uncomputed_tokens, self._budget)
            if seq.in_prefill:
                n = min(n, self._prefill_left)
                if n <= 0:
                    continue
            drafts = spec.lookahead(seq, n, self._budget, len(self.running)) if spec else []
            while not drafts and not self.bm.allocate_slots(seq, n):
                victim = self.policy.worst(self.running, ranks)
                assert victim is not None  # seq itself runs
                self._preempt(victim, out)
                preempted = True
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n + len(drafts), drafts))
                self._budget -= n + len(drafts)
                if seq.in_prefill:
                    self._prefill_left -= n
        return preempted

    def _schedule_waiting(self, rank: int, ranks: dict[int, int], out: SchedulerOutput) -> float:
        """Step 2 of ``schedule`` for the waiting sequences of ``rank``; the rank from which
        nothing more is admitted: ``rank`` if the head waits, else the best it preempted."""
        limit = math.inf
        for seq in [s for s in self.waiting if ranks[s.seq_id] == rank]:
            if self._budget <= 0 or (self._prefill_left <= 0 and seq.in_prefill):
                return rank
            if any(p is seq for p in out.preempted):
                continue  # preempted in this step: it waits at least one step
            first = not seq.block_table
            if first and self.tiers is not None and not self.tiers.ready(seq):
                out.num_awaiting_store += 1
                continue
            while not self._admit(seq, first, out):
                victim = self.policy.worst(self.running, ranks, worse_than=rank)
                if victim is None:
                    return rank
                self._preempt(victim, out)
                limit = min(limit, ranks[victim.seq_id])
        return limit

    def _admit(self, seq: Sequence, first: bool, out: SchedulerOutput) -> bool:
        """Move the waiting ``seq`` into the batch with blocks for its next chunk; False,
        changing nothing, without a running slot or blocks."""
        if len(self.running) >= self.max_num_seqs:
            return False
        bs = self.bm.block_size
        computed = self.bm.get_computed_blocks(seq) if first else None
        hits = self._tier_hits(seq, computed) if computed is not None else []
        cached = (computed.num_blocks + len(hits)) * bs if computed else 0
        start = max(seq.num_computed_tokens, cached)
        n = min(seq.num_tokens - start, self._budget)
        prompt = n > 1  # (a decode whose KV was imported computes its last token only)
        if prompt:
            n = min(n, self._prefill_left)  # >= 1: the caller checked
        if not self.bm.allocate_slots(seq, len(hits) * bs + n, computed):
            return False
        if prompt:
            self._prefill_left -= n
        if computed is not None and self.tiers is not None:
            self._load(seq, computed.num_blocks, hits, out)
        if seq.seq_id in self._recomputing:
            self._recomputing.discard(seq.seq_id)
        elif first and seq.num_output_tokens == 0:
            self.bm.note_lookup(seq, seq.num_computed_tokens)
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        out.scheduled.append(ScheduledSeq(seq, n))
        self._budget -= n
        return True

    def resolve_stall(self, out: SchedulerOutput) -> None:
        """Call with ``schedule``'s output: when it runs nothing while sequences wait (and
        none waits for the store), the queue's head does not fit even with an empty batch.
        Blocks held elsewhere come back: wait for them (``out.blocked_on_memory``). Blocks
        of queued sequences would not: free the newest's. Else nothing holds blocks and it
        can never fit (it grew past the cache): end it (``out.aborted``)."""
        if not out.is_empty or out.num_awaiting_store or not self.waiting or self.running:
            return
        seq = self.waiting[0]
        if self.fits_empty_cache(seq):
            if self.num_blocks_held_elsewhere:
                out.blocked_on_memory = True
                return
            if self.preempt_queued():
                return
        self.finish(seq, "abort", "kv cache too small")
        out.aborted.append(seq)

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
        self._count_preemption(seq)

    def _count_preemption(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.preemptions_by_tier[seq.params.service_tier] += 1

    def postprocess(self, out: SchedulerOutput) -> None:
        """Advance computed-token counters after a step and register newly full blocks."""
        now = self.policy.clock()
        self.policy.observe_step(out.scheduled, now - self._step_started)
        for item in out.scheduled:
            item.seq.last_run_time = now
            item.seq.num_computed_tokens += item.num_known_tokens  # drafts: Speculator.accept
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
        self.policy.finished(seq)
        if self.tiers is not None:
            self.tiers.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
