"""The encode side of rebalancing (rebalance/encode.py through the queue and slo policies) and
the governor's guards for it, on synthetic load reports (no processes)."""

from __future__ import annotations

import pytest

from services.common.pd_metrics import REBALANCE_ACTIONS
from services.common.proto import worker_pb2 as pb
from services.router.rebalance.base import (
    FLIP_FROM_ENCODE,
    FLIP_TO_DECODE,
    FLIP_TO_ENCODE,
    FLIP_TO_PREFILL,
    FLIPS,
    HOLD,
    Proposal,
    WorkerLoad,
)
from services.router.rebalance.factory import create_rebalance_policy
from services.router.rebalance.governor import SUPPRESSED, Governor, GovernorConfig

# Raw signals (no smoothing) and bands the cases below sit clearly inside or outside of.
QUEUE = {"smoothing": 1, "encode_queue_high": 4, "encode_queue_low": 1}


def w(iid: str, role: str, **kw) -> WorkerLoad:
    kw.setdefault("can_encode", True)
    return WorkerLoad(id=iid, role=role, state=kw.pop("state", "serving"), max_num_seqs=16, **kw)


def epd(encoders: list[dict], prefill: int = 1, decode: int = 2, **kw: dict) -> list[WorkerLoad]:
    """Encoders with the given load, plus prefill and decode workers (``kw``: their load)."""
    return (
        [w(f"e{i}", "encode", **e) for i, e in enumerate(encoders)]
        + [w(f"p{i}", "prefill", **kw.get("p", {})) for i in range(prefill)]
        + [w(f"d{i}", "decode", **kw.get("d", {})) for i in range(decode)]
    )


BUSY_ENCODER = {"images_waiting": 9, "images_encoding": 4}
IDLE_ENCODER: dict = {}
DECODE_BOUND = {"num_running": 16, "num_waiting": 4}


def test_actions_are_counted_and_proposals_name_both_roles() -> None:
    assert set(FLIPS) | {HOLD, SUPPRESSED} == set(REBALANCE_ACTIONS)
    assert Proposal(FLIP_TO_PREFILL, "r").donor_role == "decode"
    assert Proposal(FLIP_TO_ENCODE, "r", donor_role="prefill").target_role == "encode"
    assert Proposal(FLIP_FROM_ENCODE, "r", target_role="decode").donor_role == "encode"
    with pytest.raises(ValueError, match="prefill or decode side"):
        Proposal(FLIP_TO_ENCODE, "r")
    with pytest.raises(ValueError, match="unknown action"):
        Proposal("flip_to_mixed", "r")


@pytest.mark.parametrize("policy", ["queue", "slo"])
def test_image_backlog_moves_the_less_pressed_side_to_encode(policy: str) -> None:
    params = QUEUE if policy == "queue" else {k: v for k, v in QUEUE.items() if k != "smoothing"}
    p = create_rebalance_policy(policy, **params)
    d = p.propose(epd([BUSY_ENCODER]))
    # Nothing presses prefill or decode: the larger side (two decode workers) gives one.
    assert d.action == FLIP_TO_ENCODE and (d.donor_role, d.target_role) == ("decode", "encode")
    assert d.inputs["encode_backlog_per_worker"] == 13 and d.inputs["encode_workers"] == 1
    # Backlog inside the band: hold.
    assert p.propose(epd([{"images_waiting": 2}])).action == HOLD
    # No encoder at all (EP+D: prefill workers encode): not this rule's business.
    assert "encode_workers" not in p.propose(epd([])).inputs


def test_queue_policy_donor_side_and_pressure() -> None:
    p = create_rebalance_policy("queue", **QUEUE)
    # Decode is pressed (and prefill calm): the PD rule wins first, then prefill would give.
    d = p.propose(epd([BUSY_ENCODER], prefill=2, d=DECODE_BOUND))
    assert d.action == FLIP_TO_DECODE
    # Decode pressed, prefill queue mid-band (no PD flip): prefill gives a worker to encode.
    d = p.propose(epd([BUSY_ENCODER], prefill=2, p={"queued_prefill_tokens": 1000},
                      d=DECODE_BOUND))  # fmt: skip
    assert d.action == FLIP_TO_ENCODE and d.donor_role == "prefill"
    # Both sides pressed: nobody gives a worker to the encoders.
    d = p.propose(epd([BUSY_ENCODER], prefill=2, p={"queued_prefill_tokens": 5000},
                      d=DECODE_BOUND))  # fmt: skip
    assert d.action == HOLD
    # A side that would be left empty comes last: two prefill workers, one decode worker.
    d = p.propose(epd([BUSY_ENCODER], prefill=2, decode=1))
    assert d.action == FLIP_TO_ENCODE and d.donor_role == "prefill"


def test_text_only_workers_are_never_proposed_or_chosen() -> None:
    p = create_rebalance_policy("queue", **QUEUE)
    text = epd([BUSY_ENCODER], prefill=2, decode=2)
    text = [
        WorkerLoad(**{**x.__dict__, "can_encode": False}) if x.role != "encode" else x for x in text
    ]
    d = p.propose(text)
    assert d.action == HOLD and d.inputs["encode_capable_donors"] == 0
    # Only the decode side has a VL worker: it gives, whatever the pressure order says.
    mixed_models = [x if x.id != "d1" else WorkerLoad(**{**x.__dict__, "can_encode": True})
                    for x in text]  # fmt: skip
    d = p.propose(mixed_models)
    assert d.action == FLIP_TO_ENCODE and d.donor_role == "decode"
    # The governor picks the VL worker even though the text-only one is less busy.
    g = Governor(GovernorConfig(hysteresis_rounds=1, cooldown_s=0))
    busy_vl = [x if x.id != "d1" else WorkerLoad(**{**x.__dict__, "num_running": 9})
               for x in mixed_models]  # fmt: skip
    dec = g.decide("queue", d, busy_vl, now=0)
    assert dec.action == FLIP_TO_ENCODE and dec.worker_id == "d1"
    assert dec.target_role == "encode"
    # A proposal to move a text-only side is refused by the governor whoever made it.
    dec = g.decide("queue", Proposal(FLIP_TO_ENCODE, "r", donor_role="prefill"), busy_vl, now=1)
    assert dec.action == SUPPRESSED and "can encode" in dec.reason


def test_idle_encoder_goes_to_the_pressed_side_but_the_last_stays() -> None:
    p = create_rebalance_policy("queue", **QUEUE)
    d = p.propose(epd([IDLE_ENCODER, IDLE_ENCODER], d=DECODE_BOUND))
    # Decode pressed and an encoder idle: the encoder is the donor, not a prefill worker.
    assert d.action == FLIP_FROM_ENCODE and (d.donor_role, d.target_role) == ("encode", "decode")
    # Prefill pressed: the encoder goes there.
    d = p.propose(epd([IDLE_ENCODER, IDLE_ENCODER], p={"queued_prefill_tokens": 5000}))
    assert d.action == FLIP_FROM_ENCODE and d.target_role == "prefill"
    # Idle encoders, nobody pressed: roles stay (no churn).
    assert p.propose(epd([IDLE_ENCODER, IDLE_ENCODER])).action == HOLD
    # One encoder: never proposed away; the PD rule decides instead.
    d = p.propose(epd([IDLE_ENCODER], prefill=2, d=DECODE_BOUND))
    assert d.action == FLIP_TO_DECODE
    # And the governor keeps the last encoder whoever proposed moving it.
    g = Governor(GovernorConfig(hysteresis_rounds=1, cooldown_s=0))
    dec = g.decide("queue", Proposal(FLIP_FROM_ENCODE, "r", target_role="decode"),
                   epd([IDLE_ENCODER], d=DECODE_BOUND), now=0)  # fmt: skip
    assert dec.action == SUPPRESSED and "no serving encode worker" in dec.reason


def test_slo_policy_idle_encoder_goes_to_the_role_that_misses() -> None:
    p = create_rebalance_policy("slo", tpot_slo_ms=50, **{k: v for k, v in QUEUE.items()
                                                          if k != "smoothing"})  # fmt: skip
    tpot_miss = epd([IDLE_ENCODER, IDLE_ENCODER],
                    d={"num_running": 8, "num_waiting": 8, "recent_tpot_ms": 40})  # fmt: skip
    d = p.propose(tpot_miss)
    assert d.action == FLIP_FROM_ENCODE and d.target_role == "decode"


def test_encode_flips_are_damped_like_the_others() -> None:
    """Hysteresis on the smoothed backlog, then the flip, then cooldown and one flip at a time;
    unreachable and flipping encoders do not count."""
    p = create_rebalance_policy("queue", encode_queue_high=4, encode_queue_low=1, smoothing=0.5)
    g = Governor(GovernorConfig(hysteresis_rounds=2, cooldown_s=10, max_flips=5))
    busy = epd([BUSY_ENCODER])
    d0 = p.propose(epd([IDLE_ENCODER]))
    assert g.decide("queue", d0, busy, now=0).action == HOLD
    d1 = p.propose(busy)  # smoothed: (0 + 13) / 2 = 6.5 > 4
    assert d1.action == FLIP_TO_ENCODE and d1.inputs["encode_backlog_per_worker"] == 6.5
    assert g.decide("queue", d1, busy, now=1).action == HOLD  # 1/2 rounds
    dec = g.decide("queue", p.propose(busy), busy, now=2)
    assert dec.action == FLIP_TO_ENCODE and dec.worker_id == "d0" and dec.target_role == "encode"
    for t in (3, 4):
        dec = g.decide("queue", p.propose(busy), busy, now=t)
    assert dec.action == SUPPRESSED and "cooldown" in dec.reason
    flipping = busy[:-1] + [w("d1", "decode", state="flipping")]
    for t in (20, 21):
        dec = g.decide("queue", p.propose(flipping), flipping, now=t)
    assert dec.action == SUPPRESSED and "under way" in dec.reason
    gone = [w("e0", "encode", state="unreachable", **BUSY_ENCODER), *busy[1:]]
    assert "encode_workers" not in p.propose(gone).inputs


def test_bad_encode_params() -> None:
    with pytest.raises(ValueError, match="encode_queue_low must be <"):
        create_rebalance_policy("queue", encode_queue_low=5, encode_queue_high=5)
    with pytest.raises(ValueError, match="encode_queue_low must be <"):
        create_rebalance_policy("slo", encode_queue_low=9)
    assert create_rebalance_policy("slo").params()["encode_queue_high"] == 8.0


def test_worker_load_reads_the_encoder_report() -> None:
    from types import SimpleNamespace

    from services.router.rebalance.rebalancer import worker_load
    from services.router.routing.workers import RateWindow

    def handle(role: str, encode: bool, report: pb.LoadReport) -> SimpleNamespace:
        info = SimpleNamespace(role=role, capacity={"encode": encode, "max_num_seqs": 4})
        return SimpleNamespace(id="x", info=info, load=report, state="serving",
                               reachable=lambda: True, prefill_rate=RateWindow())  # fmt: skip

    report = pb.LoadReport(images_waiting=3, images_encoding=2, recent_encode_ms=7.5)
    load = worker_load(handle("encode", True, report))  # type: ignore[arg-type]
    assert (load.can_encode, load.image_backlog, load.recent_encode_ms) == (True, 5, 7.5)
    assert worker_load(handle("decode", False, pb.LoadReport())).can_encode is False  # type: ignore[arg-type]


def test_roles_a_worker_can_take_and_the_cli_table() -> None:
    from types import SimpleNamespace

    from services.cli.admin import build_parser, render_roles
    from services.router.api.admin import allowed_roles

    def handle(**capacity) -> SimpleNamespace:
        return SimpleNamespace(info=SimpleNamespace(capacity=capacity))

    assert allowed_roles(handle(kv_transfer="mooncake", encode=True)) == [
        "mixed", "prefill", "decode", "encode"
    ]  # fmt: skip
    assert allowed_roles(handle(kv_transfer="mooncake", encode=False)) == [
        "mixed", "prefill", "decode"
    ]  # fmt: skip
    assert allowed_roles(handle(kv_transfer="none", encode=True)) == ["mixed"]
    row = {"id": "w1", "role": "decode", "desired_role": "encode", "epoch": 2,
           "state": "flipping", "model": "vl", "can_take": ["mixed", "decode", "encode"]}  # fmt: skip
    text = render_roles({"workers": [row]})
    assert "decode->encode" in text and "mixed,decode,encode" in text
    args = build_parser().parse_args(["roles", "set", "w1", "encode"])
    assert (args.action, args.role) == ("set", "encode")
    assert build_parser().parse_args(["roles"]).action is None  # plain `roles` lists
