"""The router's KV index client while the kvstore restarts: a call in flight on the channel
that the restart closes (CancelledError, not AioRpcError) is a failed call, not an error of
the request or of ``/admin/status``. A real gRPC server; etcd's view is set by hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest
import pytest_asyncio

from services.common.membership import InstanceInfo
from services.common.proto import kvstore_pb2 as kpb
from services.common.proto import kvstore_pb2_grpc as kpb_grpc
from services.router.routing.kv_index import KVIndexClient
from services.router.routing.policies.base import RouteRequest
from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


class _HangingIndex(kpb_grpc.KVIndexServiceServicer):
    """Answers Stats and Lookup only when released (never, in these tests)."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def Stats(self, request, context) -> kpb.KVStoreStatsResponse:  # noqa: N802
        self.calls += 1
        await self.release.wait()
        return kpb.KVStoreStatsResponse()

    async def Lookup(self, request, context) -> kpb.LookupResponse:  # noqa: N802
        self.calls += 1
        await self.release.wait()
        return kpb.LookupResponse()


def _kvstore(address: str, incarnation: str) -> InstanceInfo:
    return InstanceInfo("kv", address, "kvstore", 0, "", incarnation, 1, "h")


@pytest_asyncio.fixture
async def index() -> AsyncIterator[tuple[KVIndexClient, _HangingIndex, str]]:
    servicer = _HangingIndex()
    server = grpc.aio.server()
    kpb_grpc.add_KVIndexServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    client = KVIndexClient([], "test")  # never started: etcd's view is set below
    client.locator.watcher.instances = {"kv": _kvstore(address, "first")}
    try:
        yield client, servicer, address
    finally:
        servicer.release.set()
        await client.locator._close()
        await server.stop(None)


async def _restart_under(client: KVIndexClient, servicer: _HangingIndex, address: str) -> None:
    """Wait for a call to be in flight, then let etcd say the kvstore restarted (a new
    incarnation) and have the next caller's ``stub()`` replace the channel under it."""
    await until(lambda: servicer.calls == 1, what="a call in flight")
    client.locator.watcher.instances = {"kv": _kvstore(address, "second")}
    await client.locator.stub()


async def test_status_during_a_kvstore_restart_says_unhealthy(index) -> None:
    client, servicer, address = index
    call = asyncio.create_task(client.status())
    await _restart_under(client, servicer, address)
    status = await asyncio.wait_for(call, 10)
    assert status["present"] and not status["healthy"]
    assert "closed" in status["error"]


async def test_lookup_during_a_kvstore_restart_routes_on_load(index) -> None:
    client, servicer, address = index
    route = RouteRequest("r1", 64, prompt_token_ids=list(range(64)))
    worker = SimpleNamespace(id="w1", info=SimpleNamespace(capacity={"kv_layout": "L",
                                                                     "block_size": 16}))  # fmt: skip
    call = asyncio.create_task(client.annotate(route, "m", [worker]))
    await _restart_under(client, servicer, address)
    await asyncio.wait_for(call, 10)
    assert route.cached == {} and client.failures == 1


async def test_a_cancelled_status_call_is_still_cancelled(index) -> None:
    client, servicer, _ = index
    call = asyncio.create_task(client.status())
    await until(lambda: servicer.calls == 1, what="a call in flight")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
