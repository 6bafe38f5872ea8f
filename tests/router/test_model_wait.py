"""A request routed to a model's only worker just before a swap began draining it (the race
between the leader's idle check and the worker's drain flag) is refused there; it waits for
the model to serve again and is served, instead of getting a 503 model_unavailable."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fake_handles import Stream, fake_handle, finished, keep_reporting, rpc_error, serve_request

from services.common.proto import worker_pb2 as pb
from services.router import serving
from services.router.errors import APIError


class DrainsOnce:
    """Generate: the first call finds the worker starting to drain for sleep (it advertises
    "flipping" and refuses); later calls answer one finished message."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.calls = 0

    def Generate(self, req: pb.GenerateRequest, timeout: float) -> Stream:  # noqa: N802
        self.calls += 1
        if self.calls > 1:
            return Stream([finished()])
        self.handle.info.state = "flipping"
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, "worker a-0 is draining", "refused")

        class Refused(Stream):
            async def __anext__(self) -> pb.GenerateResponse:
                raise error

        return Refused([])


def test_a_request_refused_by_a_worker_draining_for_sleep_is_served_after(monkeypatch):
    monkeypatch.setattr("services.router.gateway.ASLEEP_WAIT_S", 3.0)
    asyncio.run(_refused_then_served())


async def _refused_then_served() -> None:
    from services.router.config import RouterConfig
    from services.router.gateway import Gateway
    from tests.router.router_fakes import FakeTokenizer

    gw = Gateway(RouterConfig(etcd="127.0.0.1:1"), FakeTokenizer())
    a, b = fake_handle("a-0", None), fake_handle("b-0", None)
    a.info.model, b.info.model = "a", "b"
    a.stub = stub = DrainsOnce(a)
    gw.pool.handles = {h.id: h for h in (a, b)}
    reports = asyncio.create_task(keep_reporting([a, b]))

    async def wakes() -> None:  # the drain ends, the worker sleeps, then it is woken
        while a.info.state != "flipping":
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        a.info.state = "sleeping"
        await asyncio.sleep(0.4)
        a.info.state = "serving"

    waker = asyncio.create_task(wakes())
    try:
        got = [m async for _, m in serving._generate(gw, serve_request("a"))]
        assert [m.outputs[0].token_ids for m in got] == [[7]] and stub.calls == 2
        # A model that does not come back still gets its 503 with Retry-After, bounded.
        a.stub = DrainsOnce(a)
        waker.cancel()
        with pytest.raises(APIError) as err:
            [m async for _, m in serving._generate(gw, serve_request("a"))]
        assert err.value.code in ("model_unavailable", "model_asleep")
        assert err.value.headers == {"Retry-After": "10"}
    finally:
        waker.cancel()
        reports.cancel()
        await asyncio.gather(waker, reports, return_exceptions=True)
        await gw.pool.close()
