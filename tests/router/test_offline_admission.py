"""The router's offline (flex) queue over fake worker handles: offline requests wait for
headroom (queued prompt tokens, KV use, online TTFT/TPOT against the SLOs), in arrival
order, never take the online admission's tokens, and have their own limits (429, 503)."""

from __future__ import annotations

import asyncio

import pytest
from fake_handles import fake_handle, fake_pool, keep_reporting

from services.common.proto import worker_pb2 as pb
from services.router.admission import AdmissionControl
from services.router.config import RouterConfig
from services.router.errors import APIError
from services.router.metrics import RouterMetrics
from services.router.offline import OfflineAdmission

pytestmark = [pytest.mark.timeout(30), pytest.mark.asyncio]

BUSY = pb.LoadReport(num_waiting_prompt_tokens=5000, kv_utilization=0.2)
IDLE = pb.LoadReport(num_waiting_prompt_tokens=0, kv_utilization=0.2)


def gate(load: pb.LoadReport, **cfg) -> tuple[OfflineAdmission, object]:
    handle = fake_handle("w0", stub=None, load=load)
    config = RouterConfig(offline_headroom_tokens=1000, offline_headroom_kv=0.8, **cfg)
    return OfflineAdmission(config, fake_pool([handle]), RouterMetrics()), handle


async def test_offline_requests_wait_for_headroom_in_arrival_order() -> None:
    g, handle = gate(BUSY)
    reporting = asyncio.create_task(keep_reporting([handle]))
    order: list[int] = []

    async def one(i: int) -> None:
        ticket = await g.admit("m", 10)
        order.append(i)
        await asyncio.sleep(0.01)
        ticket.release()

    tasks = []
    for i in range(3):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.01)  # they arrive in this order
    await asyncio.sleep(0.3)
    assert order == [] and g.waiting == 3 and g.queued_tokens == 30
    handle.load = pb.LoadReport(num_waiting_prompt_tokens=0, kv_utilization=0.95)
    await asyncio.sleep(0.2)
    assert order == []  # the KV cache is too full still
    handle.load = IDLE
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2]
    assert g.waiting == g.running == g.queued_tokens == 0
    reporting.cancel()


async def test_a_worker_missing_its_online_slo_gets_no_offline_work() -> None:
    """Each worker's own online TTFT/TPOT (its load report) against the SLOs: one that misses
    them has no room, while another still takes offline work; offline requests' slow
    latencies and the router's own view of online requests do not hold it."""
    cfg = RouterConfig(offline_headroom_tokens=1000, slo_ttft_ms=500.0, slo_tpot_ms=50.0)
    reports = {  # (online TTFT, online TPOT) -> met
        (900.0, 10.0): False,
        (100.0, 80.0): False,
        (100.0, 10.0): True,
        (0.0, 0.0): True,
    }
    for (ttft, tpot), met in reports.items():
        load = pb.LoadReport(recent_online_ttft_ms=ttft, recent_online_tpot_ms=tpot,
                             recent_ttft_ms=5000.0, recent_tpot_ms=400.0)  # fmt: skip
        g = OfflineAdmission(cfg, fake_pool([fake_handle("w0", None, load=load)]), RouterMetrics())
        g.observe_online(0.9, 0.08)  # the router's view of online requests: slow
        assert g.has_room(g.pool.handles["w0"]) == g.has_headroom("m") == met, (ttft, tpot)
    missing = fake_handle("w0", None, load=pb.LoadReport(recent_online_ttft_ms=900.0))
    meeting = fake_handle("w1", None, load=pb.LoadReport(recent_online_ttft_ms=100.0))
    g = OfflineAdmission(cfg, fake_pool([missing, meeting]), RouterMetrics())
    reporting = asyncio.create_task(keep_reporting([missing, meeting]))
    assert (g.has_room(missing), g.has_room(meeting)) == (False, True)
    (await asyncio.wait_for(g.admit("m", 5), 2)).release()
    reporting.cancel()


async def test_offline_limits_are_their_own() -> None:
    g, handle = gate(BUSY, offline_max_waiting=2, offline_max_queued_tokens=100,
                     offline_queue_timeout_s=0.3)  # fmt: skip
    online = AdmissionControl(max_queued_tokens=50)
    reporting = asyncio.create_task(keep_reporting([handle]))
    waiting = [asyncio.create_task(g.admit("m", 40)) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(APIError) as e:  # a third waiter
        await g.admit("m", 1)
    assert e.value.status == 429 and "waiting offline requests" in e.value.message
    online.admit(30).release()  # offline tokens do not count against online admission
    for task in waiting:
        with pytest.raises(APIError) as e:
            await task
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "5"}
    assert g.waiting == g.queued_tokens == 0
    handle.load = IDLE
    held = await g.admit("m", 90)
    with pytest.raises(APIError) as e:
        await g.admit("m", 20)  # 110 > 100 offline prompt tokens
    assert e.value.status == 429 and "offline prompt tokens" in e.value.message
    held.release()
    reporting.cancel()


async def test_at_most_offline_max_running_run_at_once() -> None:
    g, handle = gate(IDLE, offline_max_running=2)
    reporting = asyncio.create_task(keep_reporting([handle]))
    a, b = await g.admit("m", 1), await g.admit("m", 1)
    third = asyncio.create_task(g.admit("m", 1))
    await asyncio.sleep(0.2)
    assert not third.done() and g.running == 2
    a.release()
    c = await asyncio.wait_for(third, 2)
    for t in (b, c):
        t.release()
    assert g.running == 0
    reporting.cancel()


async def test_admitted_offline_work_is_routed_to_a_worker_with_headroom() -> None:
    """The gate admits while some worker has room; the routing policy (round robin here)
    then picks among those that have it, while online work goes anywhere."""
    from services.router.routing.orchestrator import Orchestrator
    from services.router.routing.policies.factory import create_policy
    from services.router.routing.retry import Attempts

    busy, idle = (fake_handle(i, stub=None, load=load) for i, load in (("w0", BUSY), ("w1", IDLE)))
    pool = fake_pool([busy, idle])
    g = OfflineAdmission(RouterConfig(offline_headroom_tokens=1000), pool, RouterMetrics())
    orch = Orchestrator(pool, create_policy("round_robin"), 10.0, 3)
    orch.has_room = g.has_room

    async def picks(tier: str) -> set[str]:
        chosen = set()
        for _ in range(4):
            h = await orch._choose("m", "r", [1, 2], (), Attempts(orch.poison), tier)
            assert h is not None
            chosen.add(h.id)
        return chosen

    assert await picks("flex") == {"w1"}
    assert await picks("default") == {"w0", "w1"}
    idle.load = BUSY  # none has room (the gate let it in before): any worker
    assert await picks("flex") == {"w0", "w1"}
