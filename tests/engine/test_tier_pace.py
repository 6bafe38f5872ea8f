"""The pace of offline work beside online work (tier_policy.py's ``OnlinePace``), without a
model: offline tokens fill a step up to the reference (the quantile of recent online requests'
mean step cost), an online request already slower than the reference or in its prefill holds
them to the share, and the reference is the window's quantile as it slides."""

from __future__ import annotations

import random

from services.engine.tier_policy import (
    PACE_MIN_REQUESTS,
    PACE_WINDOW,
    PACE_WINDOW_S,
    OnlinePace,
)
from tests.engine.test_scheduler_tiers import Clock, fit_step_cost, make_sched, make_seq, step

SHARE = 0.05


def paced_sched(clock: Clock, reference: float):
    """A scheduler whose steps cost 20 ms + 1 ms per token (fitted: 20 tokens' worth of fixed
    cost, as the clock moves), with a share, a pace and ``PACE_MIN_REQUESTS`` online requests
    behind it whose mean step cost was ``reference``."""
    sched = make_sched(clock, max_num_batched_tokens=256, share=SHARE)
    sched.policy.pace = OnlinePace(0.8, clock)
    prime(sched.policy.pace, reference)
    return sched


def prime(pace: OnlinePace, reference: float) -> None:
    """Have ``PACE_MIN_REQUESTS`` online requests of mean step cost ``reference`` end."""
    for _ in range(PACE_MIN_REQUESTS):
        done = make_seq(4, "default")
        done.paced_steps, done.paced_cost = 10, 10 * reference
        pace.finished(done)


def timed_step(sched, clock: Clock, goals: dict[int, int]):
    out = step(sched, goals)
    clock.now += 0.020 + 0.001 * out.num_batched_tokens
    return out


def offline_tokens(out) -> int:
    return sum(i.num_new_tokens for i in out.scheduled if i.seq.params.service_tier == "flex")


def test_offline_work_fills_online_decode_steps_up_to_the_reference() -> None:
    """One online decode costs 20 + 1 tokens' worth; the reference is 30: offline work gets
    the 9 tokens between (the share alone gave it 1: 5 % of 21), every step, and the online
    request's mean step cost with them is the reference."""
    clock = Clock()
    sched = paced_sched(clock, reference=30.0)
    offline = [make_seq(400, "flex") for _ in range(2)]
    online = make_seq(8, "default")
    goals = {s.seq_id: 1000 for s in offline} | {online.seq_id: 12}
    for s in offline:
        sched.add(s)
    fit_step_cost(sched, clock)
    sched.add(online)
    out = timed_step(sched, clock, goals)  # its prefill: the share of 20 + 8
    assert offline_tokens(out) == 1
    for _ in range(10):
        out = timed_step(sched, clock, goals)
        assert [i.num_new_tokens for i in out.scheduled if i.seq is online] == [1]
        assert offline_tokens(out) == 9
    assert online.paced_steps == 10
    assert abs((online.paced_cost + online.paced_offline) / online.paced_steps - 30.0) < 1e-9


def test_a_slow_online_request_holds_offline_work_to_its_share() -> None:
    """An online request whose mean step cost is already past the reference (its decodes
    shared steps with prefills) has offline work held to the share of its own steps, and a
    request in its prefill to the share of the step; without them the step fills again."""
    clock = Clock()
    sched = paced_sched(clock, reference=30.0)
    offline = make_seq(400, "flex")
    slow = make_seq(4, "default")
    goals = {offline.seq_id: 1000, slow.seq_id: 3}
    sched.add(offline)
    fit_step_cost(sched, clock)
    sched.add(slow)
    timed_step(sched, clock, goals)  # its prefill
    slow.paced_steps, slow.paced_cost, slow.paced_offline = 10, 500.0, 25
    # 5 % of its 500 + 21 is 26.05 tokens' worth, 25 of them taken: 1 left
    assert offline_tokens(timed_step(sched, clock, goals)) == 1
    # 5 % of 521 + 21 = 27.1, 26 taken: 1 more; then it ends and the engine has no online work
    assert offline_tokens(timed_step(sched, clock, goals)) == 1
    assert slow.is_finished
    assert offline_tokens(timed_step(sched, clock, goals)) == 40  # 2 fixed costs
    fresh = make_seq(6, "default")
    goals[fresh.seq_id] = 100
    sched.add(fresh)
    assert offline_tokens(timed_step(sched, clock, goals)) == 1  # its prefill: 5 % of 26
    assert offline_tokens(timed_step(sched, clock, goals)) == 9  # its decodes: up to 30


def test_the_reference_is_the_quantile_of_the_last_window_of_requests() -> None:
    """... of the last ``PACE_WINDOW`` requests, and only those of the last ``PACE_WINDOW_S``
    seconds: after a burst (the benchmark's FCFS run, whose bulk requests are online) the
    reference it left let offline work take online TPOT P50 from 46 to 126 ms."""
    clock = Clock()
    pace = OnlinePace(0.8, clock)
    rng = random.Random(3)
    means: list[float] = []
    for n in range(PACE_WINDOW + 150):
        seq = make_seq(4, "default")
        seq.paced_steps = rng.randint(1, 40)
        seq.paced_cost = seq.paced_steps * rng.uniform(20.0, 60.0)
        means.append(seq.paced_cost / seq.paced_steps)
        pace.finished(seq)
        window = sorted(means[-PACE_WINDOW:])
        if n + 1 < PACE_MIN_REQUESTS:
            assert pace.reference is None
        else:
            assert pace.reference == window[int(0.8 * len(window))]
    never_decoded = make_seq(4, "default")  # a request that ended in its prefill
    pace.finished(never_decoded)
    assert [mean for _, mean in pace.recent] == means[-PACE_WINDOW:]
    clock.now = PACE_WINDOW_S - 1.0
    assert pace.reference is not None
    for _ in range(PACE_MIN_REQUESTS - 1):
        seq = make_seq(4, "default")
        seq.paced_steps, seq.paced_cost = 1, 30.0
        pace.finished(seq)
    clock.now = PACE_WINDOW_S + 0.5  # the first window is over: 19 requests are too few
    assert pace.reference is None and len(pace.recent) == PACE_MIN_REQUESTS - 1
    pace.finished(seq)
    assert pace.reference == 30.0
