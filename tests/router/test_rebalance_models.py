"""The rebalancer keeps several base models' workers apart (fake handles, no processes)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from services.common.pd_metrics import RebalanceMetrics
from services.common.proto import worker_pb2 as pb
from services.router.rebalance.base import FLIP_TO_PREFILL
from services.router.rebalance.governor import SUPPRESSED
from services.router.rebalance.rebalancer import Rebalancer
from tests.router.fake_handles import fake_handle, fake_pool


class Store:
    """Records the desired roles a round writes."""

    def __init__(self) -> None:
        self.roles: dict[str, str] = {}

    async def set(self, instance_id: str, role: str) -> None:
        self.roles[instance_id] = role


def handle(iid: str, model: str, role: str, queued: int = 0):  # type: ignore[no-untyped-def]
    h = fake_handle(iid, None, role, pb.LoadReport(num_waiting_prompt_tokens=queued))
    h.info.model = model
    h.info.capacity["max_num_seqs"] = 16
    return h


def test_a_model_short_of_prefill_never_takes_another_models_decode_worker() -> None:
    asyncio.run(_short_of_prefill())  # the fake handles open grpc.aio channels: in a loop


async def _short_of_prefill() -> None:
    # Model a's prefill queue is long; its only decode worker cannot go. Model b is idle,
    # and its decode worker is the least busy of the cluster: counted together, the two
    # models had two decode workers and b's would have become a prefill worker.
    pool = fake_pool([
        handle("a-p", "a", "prefill", queued=50_000), handle("a-d", "a", "decode"),
        handle("b-p", "b", "prefill"), handle("b-d", "b", "decode"),
    ])  # fmt: skip
    store = Store()
    rb = Rebalancer(pool, store, RebalanceMetrics(CollectorRegistry()), None, "queue",  # type: ignore[arg-type]
                    {"smoothing": 1})  # fmt: skip
    d = await rb.round(manual=True)
    assert store.roles == {}
    assert (d.model, d.proposed, d.action) == ("a", FLIP_TO_PREFILL, SUPPRESSED), d
    assert "no serving decode worker" in d.reason

    # With a second decode worker of its own, model a gives one of its own.
    pool.handles["a-d2"] = handle("a-d2", "a", "decode")
    d = await rb.round(manual=True)
    assert (d.model, d.action, d.applied) == ("a", FLIP_TO_PREFILL, True), d
    assert store.roles in ({"a-d": "prefill"}, {"a-d2": "prefill"})
