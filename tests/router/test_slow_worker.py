"""A worker whose load reports come late but who answers a health Check (a host loaded to 100
slows it down) stays in routing, ranked below workers with fresh reports; one that answers
nothing (SIGSTOP) or whose engine is stuck (NOT_SERVING for the worker service) leaves it
after the stale bound as before. Real gRPC servers on 127.0.0.1; the router's WorkerPool."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest
import pytest_asyncio

from services.common.grpc_utils import SERVER_OPTIONS
from services.common.membership import InstanceInfo
from services.common.proto import health_pb2, health_pb2_grpc
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.router.routing.workers import WorkerPool
from services.worker.health import HealthServicer

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]
WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["WorkerService"].full_name
STALE_S = 1.0  # the router's load_stale_s here
INTERVAL_MS = 50


class Engine:
    """What the health service reads of an engine: running, and how long its step has run."""

    is_running = True
    stalled = 0.0

    def stalled_s(self) -> float:
        return self.stalled


class SlowWorker(pb_grpc.WorkerServiceServicer):
    """Load reports while ``reporting`` is set; the health service answers unless ``frozen``
    (a stopped process: its port accepts, nothing answers)."""

    def __init__(self) -> None:
        self.report = pb.LoadReport(role_epoch=1)  # what each load report says
        self.reporting = asyncio.Event()
        self.reporting.set()
        self.frozen = False
        self.engine = Engine()
        outer = self

        class Health(HealthServicer):
            async def Check(self, request, context):  # noqa: N802
                while outer.frozen:
                    await asyncio.sleep(0.05)
                return await super().Check(request, context)

        self.health = Health(self.engine, engine_stall_s=30.0)

    async def StreamLoad(self, request, context):  # noqa: N802
        while True:
            await self.reporting.wait()
            yield self.report
            await asyncio.sleep(request.interval_ms / 1000)


async def start(iid: str) -> tuple[SlowWorker, grpc.aio.Server, InstanceInfo]:
    worker = SlowWorker()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_WorkerServiceServicer_to_server(worker, server)
    health_pb2_grpc.add_HealthServicer_to_server(worker.health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    info = InstanceInfo(id=iid, address=f"127.0.0.1:{port}", role="mixed", role_epoch=1,
                        model="m", incarnation="i-" + iid, pid=os.getpid(), host="test",
                        capacity={"max_model_len": 64})  # fmt: skip
    return worker, server, info


@pytest_asyncio.fixture
async def two():
    a, sa, ia = await start("w-a")
    b, sb, ib = await start("w-b")
    pool = WorkerPool(load_interval_ms=INTERVAL_MS, stale_s=STALE_S)
    pool.on_membership({"w-a": ia, "w-b": ib})
    deadline = time.monotonic() + 10
    while len(pool.candidates("mixed", "m")) < 2:
        assert time.monotonic() < deadline, "workers never usable"
        await asyncio.sleep(0.02)
    yield pool, a, b
    for h in list(pool.handles.values()):
        await h.close()
    await sa.stop(grace=None)
    await sb.stop(grace=None)


def ids(pool: WorkerPool) -> list[str]:
    return [h.id for h in pool.candidates("mixed", "m")]


async def test_late_reports_but_answering_stays_in_routing_ranked_last(two) -> None:
    pool, a, b = two
    a.reporting.clear()  # w-a's reports stop; it still answers
    seen = []
    end = time.monotonic() + 4 * STALE_S
    while time.monotonic() < end:
        await asyncio.sleep(0.1)
        h = pool.handles["w-a"]
        assert h.reachable() and not h.silent(time.monotonic()), "a slow worker left routing"
        assert "w-a" in {w.id for w in pool.serving("mixed", "m")}
        seen.append(tuple(ids(pool)))
    assert seen[-1] == ("w-b",)  # ranked below the worker whose reports are fresh
    b.reporting.clear()  # both late: both serve rather than none
    await asyncio.sleep(2 * STALE_S)
    assert ids(pool) == ["w-a", "w-b"]
    a.reporting.set()
    b.reporting.set()
    await asyncio.sleep(0.3)
    assert ids(pool) == ["w-a", "w-b"]


async def test_a_worker_that_does_not_answer_leaves_routing(two) -> None:
    pool, a, _ = two
    a.reporting.clear()
    a.frozen = True  # stopped: neither reports nor answers
    await asyncio.sleep(STALE_S * 1.6)
    h = pool.handles["w-a"]
    assert not h.reachable() and h.silent(time.monotonic())
    assert ids(pool) == ["w-b"]
    a.frozen = False  # SIGCONT
    a.reporting.set()
    deadline = time.monotonic() + 5
    while ids(pool) != ["w-a", "w-b"]:
        assert time.monotonic() < deadline, "not back after it answered again"
        await asyncio.sleep(0.05)


async def test_a_stuck_engine_answers_not_serving_and_leaves_routing(two) -> None:
    """Its reports stop on purpose (services/worker/load.py): a Check that answers must not
    keep it in routing; the whole server still answers SERVING (up's liveness probe)."""
    pool, a, _ = two
    a.engine.stalled = 31.0
    a.reporting.clear()
    await asyncio.sleep(STALE_S * 1.6)
    assert not pool.handles["w-a"].reachable() and ids(pool) == ["w-b"]
    stub = health_pb2_grpc.HealthStub(pool.handles["w-a"].channel)
    whole = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    named = await stub.Check(health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=5)
    assert whole.status == health_pb2.HealthCheckResponse.SERVING
    assert named.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reports_of_a_busy_engine_say_when_it_last_moved(two) -> None:
    """A worker in one long step sends no stream message for its length; its load reports say
    how long its engine has not moved (engine_stalled_ms), and the router keeps the time of
    that progress (progress_at), which keeps the worker's calls waiting (routing/watch.py).
    An idle engine's reports leave it as it was."""
    pool, a, _ = two
    h = pool.handles["w-a"]
    a.report = pb.LoadReport(role_epoch=1, num_running=3, engine_stalled_ms=400.0)
    deadline = time.monotonic() + 10
    while h.progress_at == 0.0:
        assert time.monotonic() < deadline, "no report of a busy engine arrived"
        await asyncio.sleep(0.02)
    assert abs(h.load_at - 0.4 - h.progress_at) < 1e-6
    a.report = pb.LoadReport(role_epoch=1)  # idle: the last progress stays where it was
    seen = h.progress_at
    await asyncio.sleep(10 * INTERVAL_MS / 1000)
    assert h.progress_at <= seen
