"""What the scheduler simulations (serving_sim.py, colocation_sim.py) share: one engine step on
a simulated clock, costing ``fixed_ms + token_ms * tokens`` (no model), and their quantiles."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.engine.scheduler import Scheduler
    from services.engine.scheduler_output import SchedulerOutput
    from services.engine.sequence import Sequence


def step_seconds(out: SchedulerOutput, fixed_ms: float, token_ms: float) -> float:
    """What the step ``out`` takes on the simulated clock."""
    return (fixed_ms + token_ms * out.num_batched_tokens) / 1000.0


def end_step(sched: Scheduler, out: SchedulerOutput) -> Iterator[Sequence]:
    """After the clock moved past the step ``out`` (the scheduler reads it): its
    postprocessing, then the sequences that sampled a token in it, each given its token (5)
    as it is reached, lazily, so that the caller handles one (finishes it) before the next."""
    sched.postprocess(out)
    for item in out.scheduled:
        if item.samples:
            item.seq.append_token(5)
            yield item.seq


def quantile_ms(values: list[float], q: int) -> float:
    """The ``q``-th percentile of ``values`` (seconds), in milliseconds; 0 for fewer than 2."""
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else 0.0
