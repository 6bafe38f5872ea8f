"""Rebalancing policies and the governor on synthetic load reports (no processes)."""

from __future__ import annotations

import pytest

from services.router.rebalance.base import (
    FLIP_TO_DECODE,
    FLIP_TO_PREFILL,
    HOLD,
    Proposal,
    WorkerLoad,
)
from services.router.rebalance.factory import available_rebalance_policies, create_rebalance_policy
from services.router.rebalance.governor import SUPPRESSED, Governor, GovernorConfig
from services.router.rebalance.rebalancer import leaves_role_empty


def w(iid: str, role: str, **kw) -> WorkerLoad:
    return WorkerLoad(id=iid, role=role, state=kw.pop("state", "serving"), max_num_seqs=16, **kw)


def cluster(prefill: list[dict], decode: list[dict]) -> list[WorkerLoad]:
    return [w(f"p{i}", "prefill", **kw) for i, kw in enumerate(prefill)] + [
        w(f"d{i}", "decode", **kw) for i, kw in enumerate(decode)
    ]


PREFILL_BOUND = cluster([{"queued_prefill_tokens": 5000}] * 2, [{"num_running": 1}] * 2)
DECODE_BOUND = cluster([{}] * 2, [{"num_running": 16, "num_waiting": 4}] * 2)
CALM = cluster([{"queued_prefill_tokens": 500}] * 2, [{"num_running": 8}] * 2)


def test_factory_names_and_bad_params() -> None:
    assert available_rebalance_policies() == ["queue", "slo", "static"]
    with pytest.raises(ValueError, match="unknown rebalance policy"):
        create_rebalance_policy("nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        create_rebalance_policy("queue", bogus=1)
    with pytest.raises(ValueError, match="must be a number"):
        create_rebalance_policy("queue", prefill_queue_high="lots")
    for nan in ("nan", float("nan")):  # passed every bound; then no comparison held
        with pytest.raises(ValueError, match="must be a number"):
            create_rebalance_policy("slo", ttft_slo_ms=nan)
    with pytest.raises(ValueError, match="prefill_queue_low must be <"):
        create_rebalance_policy("queue", prefill_queue_low=10, prefill_queue_high=5)
    with pytest.raises(ValueError, match="margin"):
        create_rebalance_policy("slo", margin=2)
    assert (
        create_rebalance_policy("queue", prefill_queue_high="4096").params()["prefill_queue_high"]
        == 4096.0
    )


def test_static_never_flips() -> None:
    p = create_rebalance_policy("static")
    for state in (PREFILL_BOUND, DECODE_BOUND, CALM):
        assert p.propose(state).action == HOLD


def test_queue_policy_directions_and_band() -> None:
    p = create_rebalance_policy("queue", smoothing=1)  # raw signals: each case on its own
    assert p.propose(PREFILL_BOUND).action == FLIP_TO_PREFILL
    d = p.propose(DECODE_BOUND)
    assert d.action == FLIP_TO_DECODE and d.inputs["decode_load"] > 0.8
    assert p.propose(CALM).action == HOLD  # inside the band: hysteresis on the signal
    # A long prefill queue does not take a worker from a busy decode side.
    both = cluster([{"queued_prefill_tokens": 5000}] * 2, [{"num_running": 16}] * 2)
    assert p.propose(both).action == HOLD
    # KV utilisation counts as decode load too.
    kv = cluster([{}] * 2, [{"kv_utilization": 0.95}] * 2)
    assert p.propose(kv).action == FLIP_TO_DECODE
    assert p.propose([w("m", "mixed")]).action == HOLD  # not PD


def test_queue_policy_smooths_a_flickering_queue() -> None:
    p = create_rebalance_policy("queue", prefill_queue_high=1000, prefill_queue_low=100,
                                smoothing=0.25)  # fmt: skip
    full = cluster([{"queued_prefill_tokens": 4000}], [{}, {}])
    empty = cluster([{}], [{}, {}])
    assert p.propose(empty).action == HOLD
    d = p.propose(full)  # one full sample after an empty one: mean 1000, not above
    assert d.action == HOLD and d.inputs["prefill_queue_tokens_per_worker"] == 1000
    assert d.inputs["prefill_queue_now"] == 4000
    # A queue full every other round is a long queue on average.
    actions = [p.propose(s).action for s in (empty, full, empty, full, empty, full)]
    assert actions[1:] == [FLIP_TO_PREFILL] * 5


def test_slo_policy_flips_toward_the_missing_role() -> None:
    p = create_rebalance_policy("slo", ttft_slo_ms=1000, tpot_slo_ms=50, prefill_tokens_per_s=1000)
    # 3000 queued tokens per prefill worker at 1000 tok/s: TTFT ~3 s, misses; TPOT fine.
    ttft_miss = cluster(
        [{"queued_prefill_tokens": 3000, "recent_ttft_ms": 100}] * 2,
        [{"num_running": 4, "recent_tpot_ms": 10}] * 2,
    )
    d = p.propose(ttft_miss)
    assert d.action == FLIP_TO_PREFILL and d.inputs["ttft_pred_ms"] == pytest.approx(3100)
    # TPOT 40 ms with as many waiting as running: predicted 80 ms > 50.
    tpot_miss = cluster(
        [{"recent_ttft_ms": 100}] * 2,
        [{"num_running": 8, "num_waiting": 8, "recent_tpot_ms": 40}] * 2,
    )
    assert p.propose(tpot_miss).action == FLIP_TO_DECODE
    # Both meet their SLOs: hold.
    ok = cluster([{"recent_ttft_ms": 100}] * 2, [{"num_running": 8, "recent_tpot_ms": 10}] * 2)
    assert p.propose(ok).action == HOLD
    # TTFT misses but the decode side would miss too with one worker fewer: hold.
    tight = cluster(
        [{"queued_prefill_tokens": 3000}] * 2, [{"num_running": 4, "recent_tpot_ms": 30}] * 2
    )
    assert p.propose(tight).action == HOLD


def test_governor_hysteresis_then_flip_then_cooldown_and_cap() -> None:
    g = Governor(GovernorConfig(hysteresis_rounds=3, cooldown_s=10, max_flips=2, flip_window_s=100))
    prop = Proposal(FLIP_TO_PREFILL, "busy prefill")
    workers = cluster([{}], [{"num_running": 5}, {"num_running": 1}, {"num_running": 3}])
    assert g.decide("queue", prop, workers, now=0).action == HOLD
    assert g.decide("queue", prop, workers, now=1).action == HOLD
    d = g.decide("queue", prop, workers, now=2)
    assert d.action == FLIP_TO_PREFILL and d.worker_id == "d1"  # the least busy donor
    assert d.target_role == "prefill"
    acts = {t: g.decide("queue", prop, workers, now=t) for t in (3, 4, 5)}
    assert [acts[t].action for t in (3, 4, 5)] == [HOLD, HOLD, SUPPRESSED]  # hysteresis again
    assert "cooldown" in acts[5].reason
    assert g.decide("queue", prop, workers, now=13).action == FLIP_TO_PREFILL  # second flip
    acts = {t: g.decide("queue", prop, workers, now=t) for t in (30, 31, 32)}
    assert acts[32].action == SUPPRESSED and "cap" in acts[32].reason  # 2 flips per 100 s
    assert g.decide("queue", prop, workers, now=103).action == FLIP_TO_PREFILL  # window moved


def test_governor_interrupted_streak_and_hold_reset() -> None:
    g = Governor(GovernorConfig(hysteresis_rounds=2, cooldown_s=0))
    workers = cluster([{}, {}], [{}, {}])
    up, down, hold = (Proposal(a, "r") for a in (FLIP_TO_PREFILL, FLIP_TO_DECODE, HOLD))
    assert g.decide("q", up, workers, now=0).action == HOLD
    assert g.decide("q", down, workers, now=1).action == HOLD  # direction changed: restart
    assert g.decide("q", hold, workers, now=2).action == HOLD
    assert g.decide("q", down, workers, now=3).action == HOLD
    assert g.decide("q", down, workers, now=4).action == FLIP_TO_DECODE


def test_governor_keeps_one_worker_per_role_and_one_flip_at_a_time() -> None:
    g = Governor(GovernorConfig(hysteresis_rounds=1, cooldown_s=0))
    one_decode = cluster([{}, {}], [{}])
    d = g.decide("q", Proposal(FLIP_TO_PREFILL, "r"), one_decode, now=0)
    assert d.action == SUPPRESSED and "no serving decode" in d.reason
    flipping = cluster([{}, {}], [{}, {"state": "flipping"}, {}])
    d = g.decide("q", Proposal(FLIP_TO_PREFILL, "r"), flipping, now=1)
    assert d.action == SUPPRESSED and "under way" in d.reason


def test_manual_and_dry_run_rounds() -> None:
    g = Governor(GovernorConfig(hysteresis_rounds=5, cooldown_s=0))
    workers = cluster([{}, {}], [{}, {}])
    prop = Proposal(FLIP_TO_DECODE, "r")
    d = g.decide("q", prop, workers, now=0, manual=True, dry_run=True)
    assert d.action == FLIP_TO_DECODE and d.dry_run  # manual: no hysteresis
    # a dry run records nothing: the next real one still starts the streak from zero
    assert g.decide("q", prop, workers, now=1).action == HOLD
    assert g.decide("q", prop, workers, now=2, manual=True).action == FLIP_TO_DECODE


def test_leaves_role_empty() -> None:
    roles = {"a": "prefill", "b": "decode", "c": "decode"}
    assert leaves_role_empty(roles, {"b": "prefill"}) is None
    assert leaves_role_empty(roles, {"a": "decode"}) == "prefill"
    assert leaves_role_empty(roles, {"b": None, "c": None}) == "decode"
    assert leaves_role_empty({"m": "mixed"}, {"m": "prefill"}) == "mixed"


def test_slo_policy_prefers_the_measured_prefill_speed() -> None:
    p = create_rebalance_policy("slo", ttft_slo_ms=1000, prefill_tokens_per_s=1000)
    slow = cluster(
        [{"queued_prefill_tokens": 3000, "prefill_tokens_per_s": 100_000}] * 2,
        [{"num_running": 4, "recent_tpot_ms": 10}] * 2,
    )
    d = p.propose(slow)  # 3000 tokens at 100k tok/s: 30 ms, no miss
    assert d.action == HOLD and d.inputs["ttft_pred_ms"] == pytest.approx(30)
    assert d.inputs["prefill_tokens_per_s"] == 100_000


@pytest.mark.asyncio  # a WorkerHandle is made in an event loop
@pytest.mark.parametrize("policy", ["queue", "slo"])
async def test_offline_load_alone_flips_no_worker(policy: str) -> None:
    """Roles follow online load: prefill workers whose queue (and slow TTFT) is offline
    prompts, or decode workers whose KV is offline sequences', move nobody; the same load
    from online requests does."""
    from fake_handles import fake_handle

    from services.common.proto import worker_pb2 as pb
    from services.router.rebalance.rebalancer import worker_load

    def run(prefill: dict, decode: dict, offline: bool) -> str:
        def report(kw: dict) -> pb.LoadReport:
            r = pb.LoadReport(num_total_blocks=100, recent_tpot_ms=10.0, **kw)
            r.recent_online_ttft_ms, r.recent_online_tpot_ms = r.recent_ttft_ms, r.recent_tpot_ms
            if offline:  # all of it is flex work: online requests are few and fast
                r.num_offline_waiting_prompt_tokens = r.num_waiting_prompt_tokens
                r.num_offline_waiting = r.num_waiting
                r.num_offline_blocks = int(r.kv_utilization * 100)
                r.recent_online_ttft_ms = 50.0 if r.recent_ttft_ms else 0.0
            return r

        handles = [fake_handle(f"p{i}", None, "prefill", report(prefill)) for i in range(2)]
        handles += [fake_handle(f"d{i}", None, "decode", report(decode)) for i in range(2)]
        p = create_rebalance_policy(policy, **({"smoothing": 1} if policy == "queue" else {}))
        return p.propose([worker_load(h) for h in handles]).action

    queued = {"num_waiting": 10, "num_waiting_prompt_tokens": 50_000, "recent_ttft_ms": 9000.0}
    assert run(queued, {"kv_utilization": 0.1}, offline=False) == FLIP_TO_PREFILL
    assert run(queued, {"kv_utilization": 0.1}, offline=True) == HOLD
    if policy == "queue":  # the slo policy reads decode pressure from TPOT, not KV use
        assert run({}, {"kv_utilization": 0.95}, offline=False) == FLIP_TO_DECODE
        assert run({}, {"kv_utilization": 0.95}, offline=True) == HOLD


@pytest.mark.asyncio  # a WorkerHandle is made in an event loop
async def test_offline_tokens_in_online_tpot_flip_no_worker() -> None:
    """The slo policy reads decode pressure from online TPOT, which the engine's pace raises
    with offline tokens by design: decode workers at 150 ms against a 100 ms SLO move a
    prefill worker to decode when that is online load, not when the engine measured 40 % of
    those requests' step time as their offline tokens' (90 ms without them)."""
    from fake_handles import fake_handle

    from services.common.proto import worker_pb2 as pb
    from services.router.rebalance.rebalancer import worker_load

    def run(offline_share: float) -> str:
        prefill = pb.LoadReport(num_total_blocks=100, recent_online_ttft_ms=100.0)
        decode = pb.LoadReport(num_total_blocks=100, num_running=8, recent_online_tpot_ms=150.0,
                               recent_online_tpot_offline_share=offline_share)  # fmt: skip
        handles = [fake_handle(f"p{i}", None, "prefill", prefill) for i in range(2)]
        handles += [fake_handle(f"d{i}", None, "decode", decode) for i in range(2)]
        loads = [worker_load(h) for h in handles]
        return create_rebalance_policy("slo", tpot_slo_ms=100.0).propose(loads).action

    assert run(0.0) == FLIP_TO_DECODE
    assert run(0.4) == HOLD
    assert run(float("nan")) == FLIP_TO_DECODE  # a broken report counts it all as online
