"""The measured draft cost (speculative/draft_cost.py): a fit of decode/verification steps'
time on their draft rows, per batch size, that the adaptive rule uses in place of the
configured ``draft_token_cost``."""

from __future__ import annotations

import pytest

from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Sequence
from services.engine.speculative.config import SpeculativeConfig
from services.engine.speculative.draft_cost import MIN_STEPS, DraftCostMeter
from services.engine.speculative.speculator import Speculator
from tests.engine.test_scheduler import make_sched


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(meter: DraftCostMeter, clock: Clock, batch: int, steps, decodes_only=True) -> None:
    """``steps``: (drafts, seconds) of steps of ``batch`` sequences, each timed by ``meter``."""
    for drafts, seconds in steps:
        meter.start()
        clock.now += seconds
        meter.observe(batch, drafts, decodes_only)


def test_the_fit_reads_a_draft_rows_share_of_the_step():
    """Steps of 8 sequences costing 20 ms + 1 ms per draft row: 0.05 of a step per draft;
    another batch size keeps its own fit (and the prior until it has one)."""
    clock = Clock()
    meter = DraftCostMeter(clock)
    feed(meter, clock, 8, [(d, 0.020 + 0.001 * d) for d in [0, 4, 8, 2, 0, 6] * 5])
    assert meter.cost(8, 0.04) == pytest.approx(0.05)
    assert meter.cost(3, 0.04) == 0.04
    feed(meter, clock, 3, [(d, 0.010 + 0.003 * d) for d in [0, 3, 1, 5] * 6])
    assert meter.cost(3, 0.04) == pytest.approx(0.3)
    assert meter.cost(8, 0.04) == pytest.approx(0.05)


def test_prompt_steps_too_few_steps_or_one_draft_count_keep_the_prior():
    """A step with a prompt chunk is not fitted (its tokens cost far less than a decode's:
    a fit over every step priced a draft at a prefill token's 0.005); under MIN_STEPS
    steps, or with one draft count only (no slope to read), the prior stands."""
    clock = Clock()
    meter = DraftCostMeter(clock)
    feed(meter, clock, 8, [(d, 0.020 + 0.0001 * d) for d in [0, 300] * 20], decodes_only=False)
    assert meter.cost(8, 0.04) == 0.04
    feed(meter, clock, 8, [(d, 0.020 + 0.001 * d) for d in [0, 4] * (int(MIN_STEPS) // 2 - 1)])
    assert meter.cost(8, 0.04) == 0.04
    feed(meter, clock, 1, [(16, 0.03)] * 40)
    assert meter.cost(1, 0.04) == 0.04


def test_a_noisy_fit_is_held_within_bounds():
    """Under a load burst the slope can read 0 or below: held at a quarter of the prior,
    never letting every sequence draft its maximum; and never above 0.9."""
    clock = Clock()
    meter = DraftCostMeter(clock)
    feed(meter, clock, 8, [(d, 0.030 - 0.001 * d) for d in [0, 4, 8] * 10])
    assert meter.cost(8, 0.04) == pytest.approx(0.01)
    feed(meter, clock, 2, [(d, 0.001 + 0.01 * d) for d in [0, 4, 8] * 10])
    assert meter.cost(2, 0.04) == 0.9


def test_a_measured_cost_turns_drafting_off_where_it_does_not_pay():
    """The rule uses the measured cost: a sequence at an estimated acceptance of 0.45 drafts
    one beside 7 others at the configured 0.03 (0.45 > 8 x 0.03), none once this worker's
    steps show a draft row costs 0.1 of a step (0.45 < 0.8), and 5 at batch 1 where
    its fit reads 0.01 (0.45 ** 5 = 0.019 > 0.01, ** 6 is not). The old rule had only
    the constant: it drafted 1 at batch 8 whatever the steps cost. With measure_draft_cost
    off the constant stands."""
    cfg = SpeculativeConfig(num_speculative_tokens=16, disable_by_batch_size=0,
                            max_draft_tokens_per_step=0, draft_token_cost=0.03,
                            measure_draft_cost=True)  # fmt: skip
    spec = Speculator(cfg, 1000, make_sched().bm)
    seq = Sequence("r", list(range(20)), SamplingParams(max_tokens=100))
    assert spec.length(seq, 100) == 16
    spec.observe(seq, 16, 0)  # estimated acceptance 0.5 / (0.5 + 0.6) = 0.45
    assert spec.length(seq, 100, 8) == 1
    clock = Clock()
    spec.meter.clock = clock
    for drafts in [0, 8, 4, 0, 8, 2] * 5:  # through the speculator's own step hooks
        spec.new_step()
        clock.now += 0.025 * (1 + 0.1 * drafts)
        spec.step_done(8, drafts, decodes_only=True)
    assert spec.draft_cost(8) == pytest.approx(0.1)
    assert spec.length(seq, 100, 8) == 0
    for drafts in [0, 16, 4, 8] * 6:
        spec.new_step()
        clock.now += 0.015 * (1 + 0.01 * drafts)
        spec.step_done(1, drafts, decodes_only=True)
    assert spec.length(seq, 100, 1) == 5
    spec.config.measure_draft_cost = False
    assert spec.length(seq, 100, 8) == 1
