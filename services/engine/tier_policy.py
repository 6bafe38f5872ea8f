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

The pace (``offline_tpot_quantile``): on a CPU the share alone leaves offline work ~40 % of
the capacity online work leaves (colocation_sim.py), because it charges every online request
the same. But online requests' TPOTs differ without any offline work (those whose decodes
shared steps with other requests' prefills are slower), and a latency goal is a tail's: the
pace lets offline tokens raise each online request's mean step cost (its TPOT) to the
``offline_tpot_quantile`` of recent online requests' mean step cost without offline work
(``reference``), and never one step's cost past it, while a request already slower than that
gets only the share. So the TPOT tail stays, and the requests below it (most) carry offline
tokens. A request in its prefill (its TTFT) gets only the share. Costs are counted in tokens'
worth (``StepCost``, a robust fit to the last steps' wall times), so the machine's timing
noise does not move the pace (``OnlinePace`` says why). ``EPDSERVE_STEP_LOG`` traces every
step's decision (step_log.py).
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from services.engine.service_tiers import DEFAULT, DEFAULT_OFFLINE_AGING_S, FLEX, PRIORITY
from services.engine.step_log import StepLog, split

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
# The fixed cost of a step, in tokens' worth, assumed until steps of different sizes were
# timed (the embedded model on a 2-core CPU measured ~24).
PRIOR_FIXED_TOKENS = 24.0
# The pace's reference is taken over the online requests that ended last (at most this many,
# in the last PACE_WINDOW_S seconds), once this many have: a burst of heavy online load leaves
# it soon (after one, offline work could take steps as long as the burst's for a while).
PACE_WINDOW = 200
PACE_WINDOW_S = 30.0
PACE_MIN_REQUESTS = 20


class StepCost:
    """``fixed / per_token`` of the linear model ``seconds = fixed + per_token * tokens`` of
    the engine's steps, fitted by least squares to the last ``WINDOW`` steps' wall times,
    refitted every ``REFIT`` steps without the steps far off the first fit.

    Why wall time, a short window and outlier rejection: the share and the pace exist to
    bound what offline tokens add to online requests' wall-clock TPOT, so the cost that
    counts is a token's wall time now. On a shared CPU that moves with the machine's load: at
    a load of 18 on 2 cores a token's wall cost was 4.6x its CPU cost (3.9 ms against 0.83)
    and a 5-10-row decode step's wall time 1.7x its CPU time, so the fixed cost in tokens'
    worth fell from ~30 (CPU time) to ~14. The exponentially fading fit this replaces had no
    outlier rejection: its slope came from the few large steps, each delayed by whatever
    else ran, and its fixed cost wandered from 42 to 160 tokens' worth within 80 s at a load
    of 14 (a 4x error that let 4x the offline tokens into steps), or to 7.
    """

    WINDOW = 256  # steps (~10 s of decode steps on a CPU)
    REFIT = 16
    OUTLIER_MADS = 3.0  # a step further than this many (scaled) MADs from the first fit

    def __init__(self, prior_fixed_tokens: float = PRIOR_FIXED_TOKENS) -> None:
        self.fixed_tokens = prior_fixed_tokens
        self.fixed_s = self.per_token_s = 0.0  # the fit in seconds (0 until there is one)
        self._steps: deque[tuple[int, float]] = deque(maxlen=self.WINDOW)
        self._since = 0

    def observe(self, tokens: int, seconds: float) -> None:
        """A step of ``tokens`` tokens took ``seconds``."""
        if not seconds > 0.0 or tokens <= 0 or math.isinf(seconds):
            return  # a clock that did not move (tests) tells nothing
        self._steps.append((tokens, seconds))
        self._since += 1
        if self._since >= self.REFIT or len(self._steps) < self.REFIT:  # early: every step
            self._since = 0
            self._fit()

    def _fit(self) -> None:
        steps = list(self._steps)
        first = _line(steps)
        if first is None:
            return  # steps of one size: no slope to fit yet
        fixed, per_token = first
        residuals = [abs(s - fixed - per_token * t) for t, s in steps]
        cut = self.OUTLIER_MADS * 1.4826 * statistics.median(residuals)
        kept = [step for step, r in zip(steps, residuals, strict=True) if r <= cut]
        fixed, per_token = _line(kept) or first
        if per_token <= 0.0:
            # NOTE: a slope of zero or less here is the machine's noise (a window of small
            # decode steps, or a cold first step longer than the next, larger one): taken at
            # its word, tokens were free and offline work got the whole step budget. The last
            # fit (or the prior) stays. A device whose steps hardly grow with their tokens
            # fits a small positive slope: a large fixed cost, most of the budget.
            return
        self.fixed_s, self.per_token_s = fixed, per_token
        self.fixed_tokens = max(0.0, fixed / per_token)

    def predict(self, tokens: int) -> float:
        """Seconds a step of ``tokens`` tokens takes by the fit (0 before a fit)."""
        return self.fixed_s + self.per_token_s * tokens

    def stats_fields(self) -> dict[str, float]:
        """EngineStats' step cost fields (milliseconds)."""
        return {"step_fixed_ms": self.fixed_s * 1000.0, "step_token_ms": self.per_token_s * 1000.0}


def _line(steps: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of seconds on tokens; None without a spread of
    sizes (a variance of tokens under 1)."""
    n = len(steps)
    if n < 2:
        return None
    mx = sum(t for t, _ in steps) / n
    my = sum(s for _, s in steps) / n
    var = sum((t - mx) ** 2 for t, _ in steps) / n
    if var < 1.0:
        return None
    slope = sum((t - mx) * (s - my) for t, s in steps) / n / var
    return my - slope * mx, slope


class OnlinePace:
    """The pace's bookkeeping (see the module's docstring): each running online request's
    decode steps, in tokens' worth (the step's fixed cost plus its online tokens), and the
    ``quantile`` of the mean step cost without offline work of the online requests that
    ended last (``reference``).

    NOTE: costs in tokens' worth, not measured seconds. The pace raises the requests below
    the quantile to it; that leaves the tail where it was only if what puts a request in the
    tail stays with it (decodes that share steps with prefills: its tokens). On a shared CPU
    most of the wall-time spread is the machine's (steps other processes delay, independent
    of the request): counted in measured seconds (9160e41) the quantile was that noise, the
    pace let offline work raise every request towards it (46 offline tokens a step beside 15
    online at a load of 16-19), and then the noise came on top: online TPOT P50 / P99 doubled
    against online alone in the same run (benchmarks/RESULTS.md, coloc4). In tokens' worth
    the raise is what the requests' tokens differ by, a few tokens a step on any machine.
    """

    def __init__(self, quantile: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.quantile, self.clock = quantile, clock
        self.recent: deque[tuple[float, float]] = deque()  # (ended, mean step cost), in order
        # Per request of ``recent``: (what its decode steps cost, of which its offline tokens).
        self._times: deque[tuple[float, float]] = deque()
        self._sorted: list[float] = []  # the means, sorted

    def observe(self, online: list[ScheduledSeq], offline_tokens: int, fixed: float) -> None:
        """A step ran ``online`` (the online part of its batch) beside ``offline_tokens``."""
        cost = fixed + sum(item.num_new_tokens for item in online)
        for item in online:
            seq = item.seq
            if seq.num_output_tokens:  # a decode: its TPOT (a prefill is its TTFT)
                seq.paced_steps += 1
                seq.paced_cost += cost
                seq.paced_offline += offline_tokens

    def finished(self, seq: Sequence) -> None:
        """The online ``seq`` ended: its mean step cost without offline work joins the
        reference's window."""
        if seq.paced_steps:
            if len(self.recent) == PACE_WINDOW:
                self._drop_oldest()
            mean = seq.paced_cost / seq.paced_steps
            self.recent.append((self.clock(), mean))
            self._times.append((seq.paced_cost + seq.paced_offline, seq.paced_offline))
            bisect.insort(self._sorted, mean)

    def _drop_oldest(self) -> None:
        _, mean = self.recent.popleft()
        self._times.popleft()
        self._sorted.pop(bisect.bisect_left(self._sorted, mean))

    def _prune(self) -> None:
        horizon = self.clock() - PACE_WINDOW_S
        while self.recent and self.recent[0][0] < horizon:
            self._drop_oldest()

    def offline_share(self) -> float:
        """Of the decode step cost of the online requests in the window, the part their
        offline tokens took (0..1; 0 when none ended in it)."""
        self._prune()
        total = sum(t for t, _ in self._times)
        return sum(o for _, o in self._times) / total if total > 0 else 0.0

    @property
    def reference(self) -> float | None:
        """The mean step cost the pace lets offline tokens raise online requests to; None
        while fewer than ``PACE_MIN_REQUESTS`` online requests ended in its window."""
        self._prune()
        if len(self._sorted) < PACE_MIN_REQUESTS:
            return None
        return self._sorted[min(len(self._sorted) - 1, int(self.quantile * len(self._sorted)))]

    def limit(self, cost: float, share: float, online: list[Sequence]) -> float:
        """Offline tokens a step whose online work (``online``, running) costs ``cost``
        may carry: its ``share`` of it, or up to the reference, and no more than any request
        in it has left: one in its prefill only the share, one decoding what keeps its mean
        step cost within the reference (or its own share, if it is slower than that)."""
        shared = max(1.0, share * cost)
        ref = self.reference
        if ref is None:
            return shared
        limit = max(shared, ref - cost)
        for seq in online:
            if not seq.num_output_tokens:
                limit = min(limit, shared)
                continue
            own = seq.paced_cost + cost
            allowed = max(share * own, ref * (seq.paced_steps + 1) - own)
            limit = min(limit, allowed - seq.paced_offline)
        return max(0.0, limit)


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
        # The pace (with a share only); None: the share alone.
        self.pace = OnlinePace(offline_tpot_quantile, clock) if offline_tpot_quantile else None
        self.step_log = StepLog.from_env()  # EPDSERVE_STEP_LOG: one line a step
        self._decision: dict[str, float | None] = {}  # offline_budget's, for the step log
        self._cpu_started = 0.0

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
            limit = max(1.0, share * (fixed + online_tokens))
        else:
            online_running = [s for s in running if self.rank(s) < OFFLINE_RANK]
            limit = self.pace.limit(fixed + online_tokens, share, online_running)
        if self.step_log is not None:
            ref = self.pace.reference if self.pace is not None and online else None
            self._decision = {"limit": limit, "ref": ref}
        return min(budget, int(limit + 1e-6))

    def stats_fields(self) -> dict[str, float]:
        """EngineStats' fields of the tiers: the step cost fit, and the part of recent
        online requests' decode time their offline tokens took (0 without a pace)."""
        share = self.pace.offline_share() if self.pace is not None else 0.0
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
        if self.pace is not None and not math.isinf(fixed):
            online = [item for item in scheduled if self.rank(item.seq) < OFFLINE_RANK]
            offline = sum(item.num_new_tokens for item in scheduled) - sum(
                item.num_new_tokens for item in online
            )
            self.pace.observe(online, offline, fixed)

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
        if self.pace is not None and self.rank(seq) < OFFLINE_RANK:
            self.pace.finished(seq)


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
