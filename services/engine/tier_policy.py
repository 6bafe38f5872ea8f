"""The scheduler's service-tier decisions (pure Python): each sequence's rank, the key the
queues are ordered by, the victim a preemption takes and the token budget offline work may
take in a step. The scheduler (scheduler.py) asks; it keeps the queues and the blocks.

Why offline work gets a share of a step and not all that online work leaves: one step runs
every scheduled token in one forward pass, so offline tokens in a step that carries online
work make that step, and so the online requests' TPOT (and the TTFT of those in prefill),
longer by what they cost. A step costs about ``fixed + per_token * tokens``; the share keeps
offline tokens to ``offline_step_share`` of the step's cost without them, i.e. at most
``share * (fixed / per_token + online tokens)`` tokens (the fraction a step cannot use carries
to the next), and to none while an online request is in its prefill (``_shared`` says why).
``StepCost`` learns the two numbers from the steps the engine runs. Where a step's cost hardly
grows with its tokens (a GPU's memory-bound decode) that is most of the budget; where it grows
in proportion (a CPU) it is a few tokens. A step without online work may not be filled
either: an online request arriving during one waits for it, so it runs offline tokens worth
at most ``OFFLINE_STEP_FIXED_COSTS`` fixed costs.

The pace (``offline_tpot_quantile``, step_pace.py; off by default) lets offline tokens raise
each online request's TPOT to a quantile of recent online requests' own, which leaves the
tail where it was only if each request's place in it is known while it runs. In the
simulation it is (TPOT P99 +6 % at 81 % of the capacity online work leaves); on a quiet CPU it
was not: the fitted fixed cost swung 16-43 tokens' worth within a run, the pace's limit (the
reference less a step's cost) jumped whenever it read low, and the requests running then
became the tail (TPOT P99 tiers / alone 1.09-1.40 against a 1.10 goal, benchmarks/RESULTS.md).
The share holds every online step, and reads fewer tokens when the fit reads low. The step cost fit is step_pace.py's too; ``EPDSERVE_STEP_LOG`` traces
every step's decision (step_log.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from services.engine.service_tiers import DEFAULT, DEFAULT_OFFLINE_AGING_S, FLEX, PRIORITY
from services.engine.step_log import StepLog, split
from services.engine.step_pace import OnlinePace, StepCost

if TYPE_CHECKING:
    from services.engine.scheduler_output import ScheduledSeq
    from services.engine.sequence import Sequence

# Scheduling ranks (lower runs first; a rank is never preempted for a worse one): the tiers'
# order, with a rank between online and offline work for flex sequences that aged.
RANKS = {PRIORITY: 0, DEFAULT: 2, FLEX: 4}
AGED_RANK = 3
OFFLINE_RANK = AGED_RANK  # this rank and worse are offline work (the step share applies)
# A step without online work runs offline tokens worth at most this many times a step's fixed
# cost: an online request arriving meanwhile waits for it to end (its TTFT).
OFFLINE_STEP_FIXED_COSTS = 2.0


class TierPolicy:
    def __init__(
        self,
        offline_aging_s: float = DEFAULT_OFFLINE_AGING_S,
        max_offline_batched_tokens: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        offline_step_share: float | None = None,
        offline_tpot_quantile: float | None = None,
    ) -> None:
        self.offline_aging_s = offline_aging_s
        self.max_offline_batched_tokens = max_offline_batched_tokens  # of a step; None: all
        self.clock = clock  # the time sequences' arrival_time is on (aging)
        # What offline tokens may add to the cost of a step carrying online work (0.1: 10 %);
        # None: all that online work leaves.
        self.offline_step_share = offline_step_share
        self.step_cost = StepCost()
        # Each online request's decode steps with and without offline tokens, kept whether or
        # not the pace is on: the load report's offline part of online TPOT (the rebalancer
        # takes it out) is read from it.
        self.online_costs = OnlinePace(offline_tpot_quantile or 1.0, clock)
        # The pace (with a share only); None: the share alone.
        self.pace = self.online_costs if offline_tpot_quantile else None
        self.step_log = StepLog.from_env()  # EPDSERVE_STEP_LOG: one line a step
        self._decision: dict[str, float | None] = {}  # offline_budget's, for the step log
        self._cpu_started = 0.0
        self._carry = 0.0  # the share's fraction of a token the last step left (0..1)

    def ranks(self, seqs: Collection[Sequence]) -> dict[int, int]:
        """The rank of each of ``seqs`` (by seq_id) now: its tier's, or for a flex one that
        aged (no step ran it for ``offline_aging_s``) the aged rank: ahead of the other
        offline sequences (it takes their slots and blocks, and their budget first) but
        still offline work, inside the step share. One that goes twice that long without a
        step even so (online work holds every slot) takes the default rank: the starvation
        bound. Without a share, aging gives the default rank at once.

        NOTE: aging counts from a sequence's last step, not its arrival: a long offline
        request served in the share online work leaves is not starving. It is for good, not
        until the next step: two flex sequences short of one slot would otherwise preempt
        each other in turn, each recomputed from scratch, and neither would end. Aged into
        the default rank at once, offline requests waiting for a slot in an overloaded
        engine took online ranks, and online budget, for the rest of their lives
        (colocation_sim.py, 64 offline clients: online TTFT P99 4.2 s against 0.2 s)."""
        now, aging = self.clock(), self.offline_aging_s
        out = {}
        for s in seqs:
            if s.params.service_tier == FLEX and s.aged < 2:
                waited = now - s.last_run_time
                s.aged = max(s.aged, 2 if waited >= 2 * aging else 1 if waited >= aging else 0)
            out[s.seq_id] = self.rank(s)
        return out

    def rank(self, s: Sequence) -> int:
        """The rank of ``s`` as far as it aged when ``ranks`` last looked."""
        if s.aged and (s.aged == 2 or self.offline_step_share is None):
            return RANKS[DEFAULT]
        return AGED_RANK if s.aged else RANKS[s.params.service_tier]

    @staticmethod
    def rank_on_arrival(seq: Sequence) -> int:
        """The rank of ``seq`` before it has waited at all."""
        return RANKS[seq.params.service_tier]

    @staticmethod
    def key(seq: Sequence, ranks: dict[int, int]) -> tuple[int, int]:
        """What running sequences are ordered by: (rank, integer priority), lower first."""
        return ranks[seq.seq_id], seq.params.priority

    def worst(
        self, seqs: list[Sequence], ranks: dict[int, int], worse_than: int | None = None
    ) -> Sequence | None:
        """The sequence of ``seqs`` to preempt first: the worst (rank, priority), the last
        among equals; only of a rank worse than ``worse_than`` if given."""
        candidates = [
            (i, s) for i, s in enumerate(seqs) if worse_than is None or ranks[s.seq_id] > worse_than
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda item: (*self.key(item[1], ranks), item[0]))[1]

    def offline_budget(
        self, budget: int, online_tokens: int, online: bool, running: Collection[Sequence] = ()
    ) -> int:
        """What offline work may take of what is left of a step's token ``budget``: at most
        its cap and, when online work is in the engine (``online``; ``online_tokens`` of it
        in this step; ``running``: the running sequences), its share of the step's cost or
        what the pace allows (see the module's docstring)."""
        if self.max_offline_batched_tokens is not None:
            budget = min(budget, self.max_offline_batched_tokens)
        share, cost = self.offline_step_share, self.step_cost
        fixed = cost.fixed_tokens
        if share is None or math.isinf(fixed):
            return budget
        if not online:
            limit = max(1.0, OFFLINE_STEP_FIXED_COSTS * fixed)
        elif self.pace is None:
            limit = self._shared(share * (fixed + online_tokens), running)
        else:
            online_running = [s for s in running if self.rank(s) < OFFLINE_RANK]
            limit = self.pace.limit(fixed + online_tokens, share, online_running)
        if self.step_log is not None:
            ref = self.pace.reference if self.pace is not None and online else None
            self._decision = {"limit": limit, "ref": ref}
        return min(budget, int(limit + 1e-6))

    def _shared(self, tokens: float, running: Collection[Sequence]) -> float:
        """The share's limit in a step with online work: ``tokens`` (the share of the step's
        cost), or none while an online sequence is in its prefill.

        NOTE: none beside an online prefill: such a step is the TTFT of the request in it and
        the slowest step of the decodes beside it, and those decodes are the TPOT tail (on a
        quiet CPU the slowest 10 % of online requests spent 23-26 % of their decode steps
        beside a prefill, the fastest half 6 %: benchmarks/RESULTS.md, coloc5). Kept out of
        those steps, offline work raises the tail by less than its share and TTFT not at all.
        The fraction of a token a step could not use carries to the next (under one token):
        8 % of a 33 tokens' worth CPU decode step is 2.6 tokens, and rounding each step down
        gave 2 (the old floor of one token a step gave 5 % of 21 tokens' worth one too)."""
        if any(s.in_prefill or not s.num_output_tokens for s in running
               if self.rank(s) < OFFLINE_RANK):  # fmt: skip
            return 0.0
        limit = tokens + self._carry
        self._carry = max(0.0, limit - math.floor(limit + 1e-6))
        return limit

    def stats_fields(self) -> dict[str, float]:
        """EngineStats' fields of the tiers: the step cost fit, and the part of recent
        online requests' decode time their offline tokens took."""
        share = self.online_costs.offline_share()
        return {**self.step_cost.stats_fields(), "online_tpot_offline_share": share}

    def start_step(self) -> float:
        """The step the scheduler just planned starts now: the clock's time."""
        if self.step_log is not None:
            self._cpu_started = time.thread_time()
        return self.clock()

    def observe_step(self, scheduled: list[ScheduledSeq], seconds: float) -> None:
        """A step ran ``scheduled`` in ``seconds``: fit the step cost, count the pace."""
        if self.step_log is not None:
            self._log_step(scheduled, seconds)
        self.step_cost.observe(sum(item.num_new_tokens for item in scheduled), seconds)
        fixed = self.step_cost.fixed_tokens
        if not math.isinf(fixed):
            online = [item for item in scheduled if self.rank(item.seq) < OFFLINE_RANK]
            offline = sum(item.num_new_tokens for item in scheduled) - sum(
                item.num_new_tokens for item in online
            )
            self.online_costs.observe(online, offline, fixed)

    def _log_step(self, scheduled: list[ScheduledSeq], seconds: float) -> None:
        assert self.step_log is not None
        cost = self.step_cost
        offline = {it.seq.seq_id for it in scheduled if self.rank(it.seq) >= OFFLINE_RANK}
        tokens = sum(item.num_new_tokens for item in scheduled)
        self.step_log.write({
            "t": round(self.clock(), 4), "s": round(seconds, 5),
            "cpu": round(time.thread_time() - self._cpu_started, 5), **split(scheduled, offline),
            "fixed": round(cost.fixed_tokens, 2), "pred": round(cost.predict(tokens), 5),
            **{k: None if v is None else round(v, 5) for k, v in self._decision.items()},
        })  # fmt: skip
        self._decision = {}

    def finished(self, seq: Sequence) -> None:
        """``seq`` left the engine (done, aborted, handed on)."""
        if self.rank(seq) < OFFLINE_RANK:
            self.online_costs.finished(seq)


def offline_stats(
    waiting: Collection[Sequence],
    running: Collection[Sequence],
    reserved: Collection[Sequence] = (),
) -> dict[str, int]:
    """EngineStats' offline (flex) share of the queues and the KV cache, so that the load's
    readers (rebalancer, offline gate) can tell online load from the offline work that fills
    what it leaves. ``reserved``: a decode worker's PD reservations (blocks, no queue place)."""
    from services.engine.sequence import prefill_tokens_left  # NOTE: lazy: torch (router)

    off_waiting = [s for s in waiting if s.params.service_tier == FLEX]
    off_running = [s for s in running if s.params.service_tier == FLEX]
    off_reserved = [s for s in reserved if s.params.service_tier == FLEX]
    holding = (*off_waiting, *off_running, *off_reserved)
    return {
        "num_offline_waiting": len(off_waiting),
        "num_offline_running": len(off_running),
        "num_offline_waiting_prompt_tokens": prefill_tokens_left(off_waiting, off_running),
        "num_offline_blocks": sum(len(s.block_table) for s in holding),
    }
