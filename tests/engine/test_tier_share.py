"""The default offline share (tier_policy.py, EngineConfig's defaults), without a model: in a
step with online decodes offline tokens add at most ``offline_step_share`` of the step's cost
(the fraction of a token carried on, so the mean is the share), beside an online prefill
none, whatever the recent online requests' history; the pace is opt-in."""

from __future__ import annotations

from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.scheduler import Scheduler
from services.engine.step_pace import PACE_MIN_REQUESTS
from tests.engine.test_scheduler_tiers import (
    BS,
    Clock,
    make_seq,
    offline_then_online,
    offline_tokens,
    step,
)


def default_sched(clock: Clock) -> Scheduler:
    """A scheduler with the engine's default tier settings, behind ``PACE_MIN_REQUESTS``
    online requests whose mean step cost was 30 tokens' worth (what a pace, if one is on,
    raises online requests to)."""
    cfg = EngineConfig()
    sched = Scheduler(BlockManager(256, BS, True), 8, 256, 1024, clock=clock,
                      offline_aging_s=cfg.offline_aging_s,
                      offline_step_share=cfg.offline_step_share,
                      offline_tpot_quantile=cfg.offline_tpot_quantile)  # fmt: skip
    for _ in range(PACE_MIN_REQUESTS):
        done = make_seq(4, "default")
        done.paced_steps, done.paced_cost = 10, 300.0
        sched.policy.finished(done)
    return sched


def test_default_share_holds_online_decode_steps_to_eight_percent() -> None:
    """A step costs 20 ms + 1 ms per token (fitted: 20 tokens' worth of fixed cost). With one
    online decode, 8 % of its 21 tokens' worth is 1.68 offline tokens a step: 1 or 2, 42 in
    25 steps. On the old defaults (share 0.05 and the pace up to the 0.8 quantile) offline
    work took 9 a step, the 30 - 21 the reference left: +43 % on the step's cost, and on a
    quiet CPU online TPOT P99 went to 1.09-1.40x online alone's (benchmarks/RESULTS.md)."""
    clock = Clock()
    sched = default_sched(clock)
    offline, online, goals = offline_then_online(sched, clock, [120] * 3, 8, 1000)
    step(sched, goals)  # its prefill
    taken = []
    for _ in range(25):
        out = sched.schedule()
        clock.now += 0.020 + 0.001 * out.num_batched_tokens
        sched.postprocess(out)
        for item in out.scheduled:
            if item.samples:
                item.seq.append_token(7)
        assert [i.num_new_tokens for i in out.scheduled if i.seq is online] == [1]
        taken.append(offline_tokens(out))
    assert set(taken) == {1, 2} and sum(taken) == int(25 * 0.08 * 21), taken


def test_no_offline_tokens_beside_an_online_prefill() -> None:
    """A step that runs an online prefill (the TTFT of its request, and the slowest step of
    the online decodes beside it: the TPOT tail) carries no offline tokens, through each
    chunk of a long prompt; the decodes before and after carry their share. The old
    defaults gave such a step the share (1 token here) and its decodes their pace."""
    clock = Clock()
    sched = default_sched(clock)
    sched.max_num_batched_tokens = 64
    offline, first, goals = offline_then_online(sched, clock, [120] * 3, 8, 1000)
    assert offline_tokens(step(sched, goals)) == 0  # its prefill
    assert [offline_tokens(step(sched, goals)) for _ in range(4)] != [0] * 4
    long = make_seq(150, "default")  # chunked: 63 + 63 + 24 tokens beside the decode
    goals[long.seq_id] = 1000
    sched.add(long)
    for _ in range(3):
        out = step(sched, goals)
        assert any(i.seq is long for i in out.scheduled) and offline_tokens(out) == 0
    assert long.num_output_tokens == 1
    assert [offline_tokens(step(sched, goals)) for _ in range(4)] != [0] * 4


def test_the_pace_is_opt_in() -> None:
    """colocation.py and the worker run the engine's defaults: the share alone."""
    cfg = EngineConfig()
    assert cfg.offline_tpot_quantile is None and cfg.offline_step_share == 0.08
    assert default_sched(Clock()).policy.pace is None


def test_offline_part_of_online_tpot_is_reported_without_the_pace() -> None:
    """The load report's offline part of online TPOT (the rebalancer's slo policy takes it out
    of online TPOT) is counted with the share alone too: it read 0 whenever the pace was off,
    so with the new default the rebalancer would read offline tokens as online load."""
    clock = Clock()
    sched = default_sched(clock)
    offline, online, goals = offline_then_online(sched, clock, [120] * 3, 8, 11)
    while not online.is_finished:
        step(sched, goals, clock)
    # 10 decode steps of 21 tokens' worth beside 1.68 offline tokens a step (16 of them)
    assert online.paced_steps == 10 and online.paced_offline == int(10 * 0.08 * 21)
    share = sched.policy.stats_fields()["online_tpot_offline_share"]
    primed = PACE_MIN_REQUESTS * 300.0  # default_sched's history, without offline tokens
    assert abs(share - 16 / (primed + 10 * 21 + 16)) < 1e-9, share
