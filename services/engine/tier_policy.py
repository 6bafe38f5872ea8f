"""The scheduler's service-tier decisions (pure Python): each sequence's rank, the key the
queues are ordered by, the victim a preemption takes and the token budget offline work may
take in a step. The scheduler (scheduler.py) asks; it keeps the queues and the blocks.

Why offline work gets a share of a step and not all that online work leaves: one step runs
every scheduled token in one forward pass, so offline tokens in a step that carries online
work make that step, and so the online requests' TPOT (and the TTFT of those in prefill),
longer by what they cost. A step costs about ``fixed + per_token * tokens``; the share keeps
offline tokens to ``offline_step_share`` of the step's cost without them, i.e. at most
``share * (fixed / per_token + online tokens)`` tokens. ``StepCost`` learns the two numbers
from the steps the engine runs. Where a step's cost hardly grows with its tokens (a GPU's
memory-bound decode) that is most of the budget; where it grows in proportion (a CPU) it is a
few tokens, and offline work runs mostly in the steps without online work. Those it may not
fill either: an online request arriving during one waits for it, so they run offline tokens
worth at most ``OFFLINE_STEP_FIXED_COSTS`` fixed costs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from services.engine.service_tiers import DEFAULT, DEFAULT_OFFLINE_AGING_S, FLEX, PRIORITY

if TYPE_CHECKING:
    from services.engine.sequence import Sequence

# Scheduling ranks (lower runs first; a rank is never preempted for a worse one): the tiers'
# order, with a rank between online and offline work for flex sequences that aged.
RANKS = {PRIORITY: 0, DEFAULT: 2, FLEX: 4}
AGED_RANK = 3
OFFLINE_RANK = AGED_RANK  # this rank and worse are offline work (the step share applies)
# A step without online work runs offline tokens worth at most this many times a step's fixed
# cost: an online request arriving meanwhile waits for it to end (its TTFT).
OFFLINE_STEP_FIXED_COSTS = 2.0
# The fixed cost of a step, in tokens' worth, assumed until steps of different sizes were
# timed (the embedded model on a 2-core CPU measured ~24).
PRIOR_FIXED_TOKENS = 24.0


class StepCost:
    """``fixed / per_token`` of the linear model ``seconds = fixed + per_token * tokens`` of
    the engine's steps, fitted by least squares with exponentially fading weights."""

    DECAY = 0.99  # weight of the fit's past on each new step (a memory of ~100 steps)

    def __init__(self, prior_fixed_tokens: float = PRIOR_FIXED_TOKENS) -> None:
        self.fixed_tokens = prior_fixed_tokens
        self._n = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        """A step of ``tokens`` tokens took ``seconds``."""
        if seconds <= 0.0 or tokens <= 0:
            return  # a clock that did not move (tests) tells nothing
        d = self.DECAY
        self._n = self._n * d + 1.0
        self._x = self._x * d + tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * seconds
        mx, my = self._x / self._n, self._y / self._n
        var = self._xx / self._n - mx * mx
        if var < 1.0:
            return  # steps of one size: no slope to fit yet
        per_token = (self._xy / self._n - mx * my) / var
        fixed = my - per_token * mx
        if per_token <= 0.0:
            self.fixed_tokens = math.inf  # tokens cost nothing measurable
        else:
            self.fixed_tokens = max(0.0, fixed / per_token)


class TierPolicy:
    def __init__(
        self,
        offline_aging_s: float = DEFAULT_OFFLINE_AGING_S,
        max_offline_batched_tokens: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        offline_step_share: float | None = None,
    ) -> None:
        self.offline_aging_s = offline_aging_s
        self.max_offline_batched_tokens = max_offline_batched_tokens  # of a step; None: all
        self.clock = clock  # the time sequences' arrival_time is on (aging)
        # What offline tokens may add to the cost of a step carrying online work (0.1: 10 %);
        # None: all that online work leaves.
        self.offline_step_share = offline_step_share
        self.step_cost = StepCost()

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
        shared = self.offline_step_share is not None
        out = {}
        for s in seqs:
            if s.params.service_tier == FLEX and s.aged < 2:
                waited = now - s.last_run_time
                s.aged = max(s.aged, 2 if waited >= 2 * aging else 1 if waited >= aging else 0)
            if s.aged and (s.aged == 2 or not shared):
                out[s.seq_id] = RANKS[DEFAULT]
            else:
                out[s.seq_id] = AGED_RANK if s.aged else RANKS[s.params.service_tier]
        return out

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

    def offline_budget(self, budget: int, online_tokens: int, online: bool) -> int:
        """What offline work may take of what is left of a step's token ``budget``: at most
        its cap and, when online work is in the engine (``online``; ``online_tokens`` of it
        in this step), its share of the step's cost (see the module's docstring)."""
        if self.max_offline_batched_tokens is not None:
            budget = min(budget, self.max_offline_batched_tokens)
        if self.offline_step_share is not None:
            fixed = self.step_cost.fixed_tokens
            if online:
                limit = self.offline_step_share * (fixed + online_tokens)
            else:
                limit = OFFLINE_STEP_FIXED_COSTS * fixed
            budget = min(budget, max(1, int(limit + 1e-6))) if limit < budget else budget
        return budget


def offline_stats(
    waiting: Collection[Sequence],
    running: Collection[Sequence],
    reserved: Collection[Sequence] = (),
) -> dict[str, int]:
    """EngineStats' offline (flex) share of the queues and the KV cache, so that what reads
    the load (the router's rebalancer and offline gate) can tell online load from the offline
    work that only fills what online work leaves. ``reserved``: a decode worker's PD
    reservations, whose blocks wait for the prompt's KV (they hold blocks, not queue places)."""
    off_waiting = [s for s in waiting if s.params.service_tier == FLEX]
    off_running = [s for s in running if s.params.service_tier == FLEX]
    off_reserved = [s for s in reserved if s.params.service_tier == FLEX]
    holding = (*off_waiting, *off_running, *off_reserved)
    return {
        "num_offline_waiting": len(off_waiting),
        "num_offline_running": len(off_running),
        "num_offline_waiting_prompt_tokens": sum(s.num_uncomputed_tokens for s in off_waiting),
        "num_offline_blocks": sum(len(s.block_table) for s in holding),
    }
