"""The costs the service tiers reason in (pure Python): ``StepCost`` fits a step's wall time
to ``fixed + per_token * tokens`` from the steps the engine runs, and ``OnlinePace`` keeps the
online requests' mean step costs that the pace holds offline work to. tier_policy.py decides
with them.

The pace (``offline_tpot_quantile``, off by default: tier_policy.py says why): on a CPU the
share alone leaves offline work ~40 % of the capacity online work leaves (colocation_sim.py),
because it charges every online request the same. But online requests' TPOTs differ without
any offline work (those whose decodes shared steps with other requests' prefills are slower),
and a latency goal is a tail's: the pace lets offline tokens raise each online request's mean
step cost (its TPOT) to the ``offline_tpot_quantile`` of recent online requests' mean step
cost without offline work (``reference``), and never one step's cost past it, while a request
already slower than that gets only the share. So the TPOT tail stays (in the simulation, where
a request's place in it is its tokens), and the requests below it (most) carry offline tokens.
A request in its prefill (its TTFT) gets only the share. Costs are counted in tokens' worth
(``StepCost``, a robust fit to the last steps' wall times), so the machine's timing noise does
not move the pace (``OnlinePace`` says why).
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.engine.scheduler_output import ScheduledSeq
    from services.engine.sequence import Sequence

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
