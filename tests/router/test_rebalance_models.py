"""The rebalancer keeps several base models' workers apart, and a request wakes a sleeping
model when the router is asked to (fake handles, no processes)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
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


def test_a_request_for_a_sleeping_model_wakes_one_worker_when_asked(monkeypatch) -> None:
    monkeypatch.setattr("services.router.gateway.ASLEEP_WAIT_S", 1.0)  # the 503 sooner
    asyncio.run(_wakes())


class SleepStub:
    """A sleeping worker's Sleep RPC: waking it up makes it advertise "serving"."""

    def __init__(self, h, busy: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.h, self.calls, self.busy = h, [], busy

    async def Sleep(self, request, timeout):  # type: ignore[no-untyped-def]  # noqa: N802
        self.calls.append(request.sleep)
        await asyncio.sleep(0.3)
        if request.sleep and request.if_idle and self.busy:  # as worker/sleep.py refuses
            raise grpc.aio.AioRpcError(grpc.StatusCode.FAILED_PRECONDITION, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), "busy")  # fmt: skip
        self.h.info.state = "sleeping" if request.sleep else "serving"
        return pb.SleepResponse(sleeping=request.sleep)


async def _wakes() -> None:
    from services.router.config import RouterConfig
    from services.router.errors import APIError
    from services.router.gateway import Gateway
    from tests.router.router_fakes import FakeTokenizer

    for wake in (False, True):
        gw = Gateway(RouterConfig(etcd="127.0.0.1:1", wake_asleep_models=wake), FakeTokenizer())
        asleep = [handle("a-0", "a", "mixed"), handle("a-1", "a", "mixed")]
        for h in asleep:
            h.info.state = "sleeping"
            h.stub = SleepStub(h)
        gw.pool.handles = {h.id: h for h in [*asleep, handle("b-0", "b", "mixed")]}
        try:
            if not wake:  # nothing wakes it: 503 with Retry-After once the wait is over
                with pytest.raises(APIError) as err:
                    await gw.resolve_awake("a")
                assert err.value.code == "model_asleep" and "Retry-After" in err.value.headers
                assert [h.stub.calls for h in asleep] == [[], []]
                continue
            assert await gw.resolve_awake("a") == ("a", 4096)
            # One wake-up, of one worker, however many rounds the request waited.
            assert [h.stub.calls for h in asleep] == [[False], []]
        finally:
            await gw.pool.close()


def test_a_pd_model_with_a_side_asleep_waits_and_wakes_that_side(monkeypatch) -> None:
    """A model served by a prefill + decode pair: with the decode worker asleep (prefill
    awake) a request waits and gets the 503 model_asleep with Retry-After (it was a
    no_workers 503 at once: not every worker slept); asked to wake, the router wakes the
    decode worker only; with both asleep, both (it woke one, leaving no pair)."""
    monkeypatch.setattr("services.router.gateway.ASLEEP_WAIT_S", 1.0)
    asyncio.run(_pd_wakes())


async def _pd_wakes() -> None:
    from services.router.config import RouterConfig
    from services.router.errors import APIError
    from services.router.gateway import Gateway
    from tests.router.router_fakes import FakeTokenizer

    for wake, sleepers in ((False, ("d",)), (True, ("d",)), (True, ("p", "d"))):
        gw = Gateway(RouterConfig(etcd="127.0.0.1:1", wake_asleep_models=wake), FakeTokenizer())
        pair = {"p": handle("a-p", "a", "prefill"), "d": handle("a-d", "a", "decode")}
        for side in sleepers:
            pair[side].info.state = "sleeping"
        for h in pair.values():
            h.stub = SleepStub(h)
        gw.pool.handles = {h.id: h for h in [*pair.values(), handle("b-0", "b", "mixed")]}
        try:
            if not wake:
                with pytest.raises(APIError) as err:
                    await gw.resolve_awake("a")
                assert err.value.code == "model_asleep" and "Retry-After" in err.value.headers
                continue
            assert await gw.resolve_awake("a") == ("a", 4096)
            assert {k: h.stub.calls for k, h in pair.items()} == {
                k: [False] if k in sleepers else [] for k in pair
            }
        finally:
            await gw.pool.close()


def test_a_wake_up_past_max_awake_models_puts_the_idlest_model_to_sleep(monkeypatch) -> None:
    """With --max-awake-models 2 and models b and c awake, a request for the sleeping model
    a puts b (idle, asked for longest ago) to sleep, then wakes a; c is left alone. With b
    and c both busy nothing sleeps nor wakes (the request gets the 503 with Retry-After).
    The cap needs --wake-asleep-models."""
    from services.router.config import RouterConfig

    monkeypatch.setattr("services.router.gateway.ASLEEP_WAIT_S", 1.0)
    with pytest.raises(ValueError, match="needs wake_asleep_models"):
        RouterConfig(etcd="127.0.0.1:1", max_awake_models=2)
    with pytest.raises(ValueError, match="max_awake_models must be >= 0"):
        RouterConfig(etcd="127.0.0.1:1", wake_asleep_models=True, max_awake_models=-1)
    asyncio.run(_swaps())


async def _swaps() -> None:
    from services.router.config import RouterConfig
    from services.router.errors import APIError
    from services.router.gateway import Gateway
    from tests.router.router_fakes import FakeTokenizer

    for busy in (False, True, "refuses"):
        cfg = RouterConfig(etcd="127.0.0.1:1", wake_asleep_models=True, max_awake_models=2)
        gw = Gateway(cfg, FakeTokenizer())
        ws = {m: handle(f"{m}-0", m, "mixed") for m in "abc"}
        ws["a"].info.state = "sleeping"
        for h in ws.values():  # "refuses": b looks idle, but a request reached it since
            h.stub = SleepStub(h, busy=busy == "refuses")
        gw.pool.handles = {h.id: h for h in ws.values()}
        gw.swapper.is_leader = lambda: True  # the one router: it leads, so it swaps
        gw.swapper._last_asked.update(b=1.0, c=2.0)  # b was asked for longest ago
        if busy is True:
            ws["b"].load.num_inflight = 1
            ws["c"].load.num_waiting = 1
        try:
            if busy == "refuses":  # b is asked, refuses; a stays asleep: the 503
                with pytest.raises(APIError) as err:
                    await gw.resolve_awake("a")
                assert err.value.code == "model_asleep"
                assert ws["b"].stub.calls[0] is True and not ws["a"].stub.calls
                assert {m: h.info.state for m, h in ws.items()} == {
                    "a": "sleeping", "b": "serving", "c": "serving"}  # fmt: skip
                continue
            if busy:
                with pytest.raises(APIError) as err:
                    await gw.resolve_awake("a")
                assert err.value.code == "model_asleep" and "Retry-After" in err.value.headers
                assert [h.stub.calls for h in ws.values()] == [[], [], []]
                continue
            assert await gw.resolve_awake("a") == ("a", 4096)
            assert {m: h.stub.calls for m, h in ws.items()} == {"a": [False], "b": [True], "c": []}
            assert {m: h.info.state for m, h in ws.items()} == {
                "a": "serving", "b": "sleeping", "c": "serving"}  # fmt: skip
        finally:
            await gw.pool.close()


def test_a_model_whose_workers_load_another_is_a_503_with_retry_after() -> None:
    asyncio.run(_loading())


async def _loading() -> None:
    from services.router.config import RouterConfig
    from services.router.errors import APIError
    from services.router.gateway import Gateway
    from tests.router.router_fakes import FakeTokenizer

    gw = Gateway(RouterConfig(etcd="127.0.0.1:1"), FakeTokenizer())
    moving = handle("a-0", "a", "mixed")
    moving.info.state = "loading"  # draining before its restart with another model
    gw.pool.handles = {h.id: h for h in [moving, handle("b-0", "b", "mixed")]}
    try:
        with pytest.raises(APIError) as err:
            gw.resolve_model("a")
        assert (err.value.status, err.value.code) == (503, "model_unavailable")
        assert "Retry-After" in err.value.headers
        # Not the rebalancer's to move either.
        rb = Rebalancer(gw.pool, Store(), RebalanceMetrics(CollectorRegistry()), None, "queue")  # type: ignore[arg-type]
        assert rb.serving_roles(model="a") == {} and rb.serving_roles(model="b") == {"b-0": "mixed"}
    finally:
        await gw.pool.close()


def test_with_a_cap_only_the_leader_swaps_from_every_routers_waiting_requests(
    monkeypatch,
) -> None:
    """Cap 1, model b awake and idle, a asleep. A router that does not lead never swaps
    for its own waiting request (it gets the 503; the request was counted on its waiting
    board meanwhile); the leader, seeing a request wait for a at another router (its
    board's listing), puts b to sleep and wakes a. b, woken or asked for less than
    MIN_AWAKE_S ago, is not put to sleep. Before, every router swapped on its own: two
    routers each saw room under the cap and woke a model each."""
    monkeypatch.setattr("services.router.gateway.ASLEEP_WAIT_S", 1.0)
    asyncio.run(_leader_swaps(monkeypatch))


async def _leader_swaps(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from services.router import model_swap
    from services.router.config import RouterConfig
    from services.router.errors import APIError
    from services.router.gateway import Gateway
    from tests.router.router_fakes import FakeTokenizer

    monkeypatch.setattr(model_swap, "SWAP_TICK_S", 0.05)
    cfg = RouterConfig(etcd="127.0.0.1:1", wake_asleep_models=True, max_awake_models=1)
    gw = Gateway(cfg, FakeTokenizer())
    ws = {m: handle(f"{m}-0", m, "mixed") for m in "ab"}
    ws["a"].info.state = "sleeping"
    for h in ws.values():
        h.stub = SleepStub(h)
    gw.pool.handles = {h.id: h for h in ws.values()}
    leads = False
    gw.swapper.is_leader = lambda: leads
    counted: list[dict[str, int]] = []
    real_wanted = gw.swapper.wanted
    gw.swapper.wanted = lambda m: (counted.append(dict(gw.swapper.board.local)), real_wanted(m))
    task = asyncio.create_task(gw.swapper._run())  # the leader's ticks (no etcd here)
    try:
        with pytest.raises(APIError) as err:  # not the leader: waits, counted, 503
            await gw.resolve_awake("a")
        assert err.value.code == "model_asleep" and "Retry-After" in err.value.headers
        assert counted and all(c == {"a": 1} for c in counted) and not gw.swapper.board.local
        assert [h.stub.calls for h in ws.values()] == [[], []]

        # The leader: a request waits for a at another router (as its listing reads).
        leads = True
        gw.swapper.asked("b")  # b asked for just now: not put to sleep yet
        gw.swapper.board._listed = {"a": 1}
        gw.swapper.board._listed_at = time.monotonic() + 3600
        await asyncio.sleep(0.5)
        assert [h.stub.calls for h in ws.values()] == [[], []]
        gw.swapper._last_asked["b"] -= model_swap.MIN_AWAKE_S
        for _ in range(100):
            if ws["a"].info.state == "serving":
                break
            await asyncio.sleep(0.05)
        assert {m: h.stub.calls for m, h in ws.items()} == {"a": [False], "b": [True]}
        assert {m: h.info.state for m, h in ws.items()} == {"a": "serving", "b": "sleeping"}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await gw.pool.close()


def test_a_model_draining_to_sleep_is_a_wait_then_a_503_with_retry_after(monkeypatch) -> None:
    """The only worker of model a drains to go to sleep (advertised "flipping"): a request
    waits for it and gets model_unavailable with Retry-After; one that sees it serve again
    is served. A request the worker refused because its drain began after the request was
    routed gets the same 503 from the orchestrator. Before, both were a no_workers 503 with
    no Retry-After (found by test_model_swap_cluster on the code before)."""
    monkeypatch.setattr("services.router.gateway.ASLEEP_WAIT_S", 1.0)
    asyncio.run(_draining())


async def _draining() -> None:
    from services.router.config import RouterConfig
    from services.router.errors import APIError
    from services.router.gateway import Gateway
    from services.router.routing.unavailable import no_worker_error
    from tests.router.router_fakes import FakeTokenizer

    gw = Gateway(RouterConfig(etcd="127.0.0.1:1"), FakeTokenizer())
    a, b = handle("a-0", "a", "mixed"), handle("b-0", "b", "mixed")
    a.info.state = "flipping"
    gw.pool.handles = {h.id: h for h in (a, b)}
    try:
        with pytest.raises(APIError) as err:
            await gw.resolve_awake("a")
        assert (err.value.code, err.value.headers) == ("model_unavailable", {"Retry-After": "10"})
        late = asyncio.create_task(gw.resolve_awake("a"))
        await asyncio.sleep(0.3)
        a.info.state = "serving"
        assert await late == ("a", 4096)
        a.info.state = "sleeping"
        assert no_worker_error(gw.pool, "a", "x").code == "model_asleep"
        assert no_worker_error(gw.pool, "b", "none for b").code == "no_workers"
    finally:
        await gw.pool.close()


def test_a_policy_stored_by_another_router_is_adopted_within_a_round() -> None:
    """`epdserve policy set` through one router reached the others up to 7 s later (each read
    etcd's policy every 5 s): `status` through them told the old policy meanwhile. Now every
    round reads it."""
    asyncio.run(_adopts_stored_policy())


async def _adopts_stored_policy() -> None:
    class PolicyStore(Store):
        document: str | None = None

        async def get_policy(self) -> str | None:
            return self.document

        async def close(self) -> None:
            pass

    store = PolicyStore()
    rb = Rebalancer(fake_pool([]), store, RebalanceMetrics(CollectorRegistry()), None,  # type: ignore[arg-type]
                    "static", interval_s=0.02)  # fmt: skip
    await rb.start()
    try:
        for name in ("queue", "static", "queue"):
            store.document = f'{{"name": "{name}", "params": {{}}}}'
            for _ in range(100):  # 2 s: up to 5 s before
                await asyncio.sleep(0.02)
                if rb.policy.name == name:
                    break
            assert rb.policy.name == name
    finally:
        await rb.stop()
