"""What a draft token costs on this worker, measured: ``DraftCostMeter``.

The adaptive rule (speculator.py) lets a sequence draft while a draft's chance of being
accepted beats what it adds to the step: ``a ** j > cost * B``, ``cost`` being one draft
row's share of a decode step of ``B`` sequences. A constant (``draft_token_cost``) is right
on one machine, model and load at best: on 2 CPU cores with the 135M model it read 0.016 to
0.05 depending on the batch and the kernels (RESULTS.md), on a GPU it is near 0.

So each step made only of decodes and verifications (no prompt chunk: a prefill's tokens
cost little more wall time than a decode's on a CPU, and a fit over every step priced a
draft row at a prefill token's 0.005, specdec6's reverted 9194612) is timed from its
schedule to the end of its sampling (the extra sampler rounds of a verification are part of
its cost), and, per batch size ``B``, an exponentially weighted least-squares line
``seconds = alpha + beta * drafts`` is fitted over those steps. ``beta / alpha`` is the
measured cost: the slope needs steps with different numbers of drafts, which the adaptive
lengths give (and steps without any: sequences that stopped drafting). Until a batch size has
``MIN_STEPS`` steps whose draft counts vary, the configured cost stands.

NOTE: wall time, not CPU time: the draft rows run in OpenMP's threads on a CPU and on the
device elsewhere. Load moves both kinds of step alike (they interleave step by step), and the
fit's decay forgets a burst within ~``1 / (1 - DECAY)`` steps. The measured cost is held
between a quarter of the configured cost and ``MAX_COST``: a fit under a load burst can read
0 or below, which would let every sequence draft its maximum.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

DECAY = 0.97  # weight of a step ~23 steps back: 0.5
MIN_STEPS = 16.0  # weighted steps of one batch size before its fit is used
MIN_DRAFT_VARIANCE = 0.2  # of the draft counts in those steps (drafts squared)
MAX_COST = 0.9
MAX_BATCH = 256  # batch sizes fitted (a larger one shares the largest's fit)


@dataclass
class _Fit:
    """Exponentially weighted sums over one batch size's steps."""

    n: float = 0.0
    x: float = 0.0  # drafts
    xx: float = 0.0
    y: float = 0.0  # seconds
    xy: float = 0.0

    def add(self, drafts: float, seconds: float) -> None:
        self.n = DECAY * self.n + 1.0
        self.x = DECAY * self.x + drafts
        self.xx = DECAY * self.xx + drafts * drafts
        self.y = DECAY * self.y + seconds
        self.xy = DECAY * self.xy + drafts * seconds

    def line(self) -> tuple[float, float] | None:
        """(alpha, beta), or None while the steps are too few or their drafts too alike."""
        if self.n < MIN_STEPS:
            return None
        mx, my = self.x / self.n, self.y / self.n
        var = self.xx / self.n - mx * mx
        if var < MIN_DRAFT_VARIANCE:
            return None
        beta = (self.xy / self.n - mx * my) / var
        return my - beta * mx, beta


class DraftCostMeter:
    """Times decode/verification steps and fits their cost per draft row, per batch size."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._fits: dict[int, _Fit] = {}
        self._started: float | None = None

    def start(self) -> None:
        """A step is being scheduled."""
        self._started = self.clock()

    def observe(self, batch: int, drafts: int, decodes_only: bool) -> None:
        """The step started last has sampled: ``batch`` sequences, ``drafts`` draft rows;
        ``decodes_only``: no prompt chunk in it (a step with one is not fitted)."""
        started, self._started = self._started, None
        if started is None or not decodes_only or batch <= 0:
            return
        seconds = self.clock() - started
        if seconds <= 0:
            return
        self._fits.setdefault(min(batch, MAX_BATCH), _Fit()).add(drafts, seconds)

    def cost(self, batch: int, prior: float) -> float:
        """One draft row's share of a decode step of ``batch`` sequences: measured when this
        batch size's fit holds, else ``prior`` (the configured cost)."""
        fit = self._fits.get(min(max(1, batch), MAX_BATCH))
        line = fit.line() if fit is not None else None
        if line is None or line[0] <= 0:
            return prior
        alpha, beta = line
        return min(MAX_COST, max(prior / 4, beta / alpha))
