"""The pace of offline work beside online work (step_pace.py's ``OnlinePace``), without a
model: offline tokens fill a step up to the reference (the quantile of recent online requests'
mean step cost), an online request already slower than the reference or in its prefill holds
them to the share, and the reference is the window's quantile as it slides."""

from __future__ import annotations

import json
import random

from services.engine.step_pace import (
    PACE_MIN_REQUESTS,
    PACE_WINDOW,
    PACE_WINDOW_S,
    PRIOR_FIXED_TOKENS,
    OnlinePace,
    StepCost,
)
from tests.engine.test_scheduler_tiers import (
    Clock,
    make_sched,
    make_seq,
    offline_then_online,
    offline_tokens,
    step,
)

SHARE = 0.05


def paced_sched(clock: Clock, reference: float):
    """A scheduler whose steps cost 20 ms + 1 ms per token (fitted: 20 tokens' worth of fixed
    cost, as the clock moves), with a share, a pace and ``PACE_MIN_REQUESTS`` online requests
    behind it whose mean step cost was ``reference`` (tokens' worth)."""
    sched = make_sched(clock, max_num_batched_tokens=256, share=SHARE)
    sched.policy.pace = sched.policy.online_costs = OnlinePace(0.8, clock)
    prime(sched.policy.pace, reference)
    return sched


def prime(pace: OnlinePace, reference: float) -> None:
    """Have ``PACE_MIN_REQUESTS`` online requests of mean step cost ``reference`` end."""
    for _ in range(PACE_MIN_REQUESTS):
        done = make_seq(4, "default")
        done.paced_steps, done.paced_cost = 10, 10 * reference
        pace.finished(done)


def test_offline_work_fills_online_decode_steps_up_to_the_reference() -> None:
    """One online decode costs 20 + 1 tokens' worth; the reference is 30: offline work gets
    the 9 tokens between (the share alone gave it 1: 5 % of 21), every step, and the online
    request's mean step cost with them is the reference."""
    clock = Clock()
    sched = paced_sched(clock, reference=30.0)
    offline, online, goals = offline_then_online(sched, clock, [400] * 2, 8, 12)
    out = step(sched, goals, clock)  # its prefill: the share of 20 + 8
    assert offline_tokens(out) == 1
    for _ in range(10):
        out = step(sched, goals, clock)
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
    [offline], slow, goals = offline_then_online(sched, clock, [400], 4, 3)
    step(sched, goals, clock)  # its prefill
    slow.paced_steps, slow.paced_cost, slow.paced_offline = 10, 500.0, 25
    # 5 % of its 500 + 21 is 26.05 tokens' worth, 25 of them taken: 1 left
    assert offline_tokens(step(sched, goals, clock)) == 1
    # 5 % of 521 + 21 = 27.1, 26 taken: 1 more; then it ends and the engine has no online work
    assert offline_tokens(step(sched, goals, clock)) == 1
    assert slow.is_finished
    assert offline_tokens(step(sched, goals, clock)) == 40  # 2 fixed costs
    fresh = make_seq(6, "default")
    goals[fresh.seq_id] = 100
    sched.add(fresh)
    assert offline_tokens(step(sched, goals, clock)) == 1  # its prefill: 5 % of 26
    assert offline_tokens(step(sched, goals, clock)) == 9  # its decodes: up to 30


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


def test_step_cost_ignores_delayed_steps_and_follows_the_machine() -> None:
    """The fit holds through steps that other processes delayed (a shared CPU: 5 % of them,
    by 50 ms to 1 s), and a window later it is the machine's new cost (a token's wall time
    3x, as under load), not a blend of the two."""
    rng = random.Random(1)
    cost = StepCost()
    cost.observe(48, 0.83)  # a cold first step, then a larger, faster one (run 5's start)
    cost.observe(145, 0.28)
    assert cost.fixed_tokens == PRIOR_FIXED_TOKENS  # was infinite: tokens read as free

    def run(fixed_s: float, token_s: float, steps: int) -> None:
        for _ in range(steps):
            tokens = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 60, 110])
            seconds = fixed_s + token_s * tokens
            if rng.random() < 0.05:
                seconds += rng.uniform(0.05, 1.0)
            cost.observe(tokens, seconds)

    run(0.022, 0.0009, 400)
    assert abs(cost.fixed_tokens - 0.022 / 0.0009) < 3  # 24.4 tokens' worth
    assert abs(cost.predict(10) - 0.031) < 0.002
    run(0.030, 0.0027, StepCost.WINDOW)
    assert abs(cost.fixed_tokens - 0.030 / 0.0027) < 2  # 11.1
    # A window of decode steps whose times fall as their rows grow (noise): no slope to
    # believe, the last fit stays (it read tokens as free: the whole budget went offline).
    for i in range(StepCost.WINDOW):
        tokens = 1 + i % 8
        cost.observe(tokens, 0.050 - 0.002 * tokens)
    assert abs(cost.fixed_tokens - 0.030 / 0.0027) < 2


def test_steps_the_machine_delayed_do_not_move_the_pace() -> None:
    """Every fourth step of an online request is delayed 200 ms (other processes: nothing
    the request's tokens do): offline work still gets the 9 tokens the reference leaves in
    every step, and the fit ignores the delayed steps. Counted in measured seconds (9160e41)
    the delays put the request past the reference and held offline work to its share, and
    the machine's noise set the reference itself (benchmarks/RESULTS.md, coloc4)."""
    clock = Clock()
    sched = paced_sched(clock, reference=30.0)
    offline = [make_seq(400, "flex") for _ in range(2)]
    goals = {s.seq_id: 1000 for s in offline}
    for s in offline:
        sched.add(s)
    for tokens in [1, 2, 4] * 14:  # 42 exact steps: the fit's window
        sched.policy.max_offline_batched_tokens = tokens
        step(sched, goals, clock)
    sched.policy.max_offline_batched_tokens = None
    online = make_seq(8, "default")
    goals[online.seq_id] = 100
    sched.add(online)
    step(sched, goals, clock)  # its prefill
    for i in range(12):
        out = step(sched, goals, clock, delay=0.2 if i % 4 == 3 else 0.0)
        assert offline_tokens(out) == 9, i
    assert abs(sched.policy.step_cost.fixed_tokens - 20.0) < 1e-6


def test_step_log_writes_a_line_per_step(tmp_path, monkeypatch) -> None:
    """EPDSERVE_STEP_LOG: one JSON line a step, its online and offline parts apart, its
    measured time and the budget's decision; a path that cannot be written logs nothing and
    the steps run."""
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("EPDSERVE_STEP_LOG", str(path))
    clock = Clock()
    sched = paced_sched(clock, reference=30.0)
    [offline], online, goals = offline_then_online(sched, clock, [400], 8, 5)
    for _ in range(3):
        step(sched, goals, clock)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 6  # the fit's 3 steps, then 3
    last = lines[-1]
    assert (last["on_rows"], last["on_tokens"], last["on_decodes"]) == (1, 1, 1)
    assert last["on_ids"] == [online.seq_id] and lines[3]["on_ids"] == []  # then its prefill
    assert (last["off_rows"], last["off_tokens"]) == (1, 9) and last["ref"] == 30.0
    assert abs(last["s"] - 0.030) < 1e-9 and abs(last["pred"] - 0.030) < 1e-9
    monkeypatch.setenv("EPDSERVE_STEP_LOG", str(tmp_path / "no" / "such" / "dir" / "f"))
    sched = paced_sched(clock, reference=30.0)
    alone = make_seq(8, "flex")
    sched.add(alone)
    assert offline_tokens(step(sched, {alone.seq_id: 2}, clock)) == 8


def test_offline_share_of_online_decode_time() -> None:
    """What the rebalancer takes out of online TPOT: of the window's online requests' decode
    time, the part their offline tokens took; requests older than the window leave it."""
    clock = Clock()
    pace = OnlinePace(0.8, clock)
    assert pace.offline_share() == 0.0
    for cost, offline in ((0.300, 0.100), (0.500, 0.0)):
        seq = make_seq(4, "default")
        seq.paced_steps, seq.paced_cost, seq.paced_offline = 10, cost, offline
        pace.finished(seq)
    assert abs(pace.offline_share() - 0.100 / 0.900) < 1e-9
    clock.now = PACE_WINDOW_S + 1.0
    assert pace.offline_share() == 0.0 and not pace.recent
