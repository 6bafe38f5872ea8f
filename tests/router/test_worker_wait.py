"""A request that finds no usable worker while some serve waits a moment for one: the only
survivor of a killed worker may be out of routing until its next load report."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from fake_handles import Stream, fake_handle, fake_pool, finished, keep_reporting, rpc_error

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.routing.orchestrator import Orchestrator
from services.router.routing.policies.factory import create_policy
from services.router.routing.workers import WorkerHandle


class Stub:
    """Generate fails with ``error`` (a dead worker) or answers one finished message."""

    def __init__(self, error: grpc.aio.AioRpcError | None = None) -> None:
        self.error = error
        self.calls = 0

    def Generate(self, req: pb.GenerateRequest, timeout: float) -> Stream:  # noqa: N802
        self.calls += 1
        if self.error is not None:
            error = self.error

            class Failing(Stream):
                async def __anext__(self) -> pb.GenerateResponse:
                    raise error

            return Failing([])
        return Stream([finished()])


async def report_later(h: WorkerHandle, delay: float) -> None:
    """``h``'s next load report arrives after ``delay`` seconds, then every 50 ms."""
    await asyncio.sleep(delay)
    await keep_reporting([h])


async def serve(handles: list[WorkerHandle], wait_s: float = 5.0) -> list[pb.GenerateResponse]:
    orch = Orchestrator(
        fake_pool(handles), create_policy("round_robin"), timeout_s=30.0, max_attempts=3
    )
    orch.WORKER_WAIT_S = wait_s
    params = pb.SamplingParams(max_tokens=1)
    return [m async for m in orch.generate("m", "r1", [1, 2, 3], params)]


def dead() -> Stub:
    return Stub(rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed"))


@pytest.mark.parametrize("first", ["survivor-out", "dead-first"])
def test_request_waits_for_the_survivor_of_a_killed_worker(first) -> None:
    async def main() -> None:
        w0, w1 = fake_handle("w0", dead()), fake_handle("w1", Stub())
        # The survivor is out of routing until its next report (a call to it failed).
        w1.mark_failed()
        if first == "survivor-out":
            w0.mark_failed()  # the dead one too: no usable worker at arrival
        reporter = asyncio.create_task(report_later(w1, 0.5))
        try:
            out = await serve([w0, w1])
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        assert [m.outputs[0].token_ids for m in out] == [[7]]
        assert w1.stub.calls == 1

    asyncio.run(main())


def test_no_worker_left_is_still_a_503_after_a_bounded_wait() -> None:
    async def main() -> None:
        w0 = fake_handle("w0", dead())
        w0.mark_failed()
        started = time.monotonic()
        with pytest.raises(APIError) as err:
            await serve([w0], wait_s=0.5)
        assert err.value.status == 503
        assert time.monotonic() - started < 5.0

    asyncio.run(main())


def test_draining_workers_are_not_waited_for() -> None:
    async def main() -> None:
        w0 = fake_handle("w0", Stub())
        w0.load = pb.LoadReport(draining=True)
        started = time.monotonic()
        with pytest.raises(APIError):
            await serve([w0], wait_s=30.0)
        assert time.monotonic() - started < 5.0

    asyncio.run(main())


def test_a_started_gateway_already_knows_the_registered_workers() -> None:
    """A router restarted beside serving workers (`epdserve up` restarts a killed one) opens
    its port only after its first etcd listing: a request at once got a 503 "no workers
    available" before."""
    from router_fakes import FakeTokenizer, start_fake_worker

    from services.common.etcd_server import EtcdServer
    from services.router.config import RouterConfig
    from services.router.gateway import Gateway

    async def main(etcd: str) -> None:
        worker = await start_fake_worker(etcd, "first-listing", "w1")
        gw = Gateway(RouterConfig(cluster="first-listing", etcd=etcd), FakeTokenizer())
        try:
            await gw.start()
            assert gw.pool.models() == {worker.engine.model_name: worker.engine.max_model_len}
            assert gw.resolve_model(worker.engine.model_name, serving=False)
        finally:
            await gw.stop()
            await worker.stop()

    with EtcdServer() as etcd:
        asyncio.run(main(etcd.endpoint))
