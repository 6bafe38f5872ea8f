"""The worker's KV event publisher against a real index servicer: numbered batches, a reset
with the whole state after the index forgot it, and STORE blocks dropped with the store."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio

from services.common.proto import kvstore_pb2_grpc as kpb_grpc
from services.kvstore.index import KVIndex
from services.kvstore.server import KVIndexServicer
from services.worker.kv_events import KVEventPublisher


@dataclass
class Ev:
    kind: str
    block_hashes: list[int]
    tier: str = "device"


@dataclass
class FakeEngine:
    """``call(fn)`` as AsyncLLMEngine has it; ``fn`` sees this object as the LLMEngine."""

    events: list[Ev] = field(default_factory=list)

    def take_kv_events(self) -> list[Ev]:
        out, self.events = self.events, []
        return out

    async def call(self, fn):
        return fn(self)


@pytest_asyncio.fixture
async def served():
    index = KVIndex()
    server = grpc.aio.server()
    kpb_grpc.add_KVIndexServiceServicer_to_server(KVIndexServicer(index, "kv"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    engine = FakeEngine()
    pub = KVEventPublisher(engine, "w1", "inc", "m", "L", [], "test", heartbeat_s=0.0)
    stub = kpb_grpc.KVIndexServiceStub(channel)
    changed = [True]

    async def fixed_stub():  # NOTE: etcd discovery is covered by the cluster test
        first, changed[0] = changed[0], False
        return stub, first

    pub.locator.stub = fixed_stub  # type: ignore[method-assign]
    yield index, engine, pub
    await channel.close()
    await server.stop(None)


def device(index: KVIndex, hashes: list[int]) -> int:
    (m,) = index.lookup("m", "L", hashes).matches or [None]
    return m.device_blocks if m else 0


@pytest.mark.asyncio
async def test_batches_then_resync_after_the_index_forgot(served) -> None:
    index, engine, pub = served
    engine.events = [Ev("stored", [1, 2, 3])]
    await pub.publish_once()  # first contact: a reset batch
    assert device(index, [1, 2, 3]) == 3 and pub.resyncs == 0
    engine.events = [Ev("removed", [3]), Ev("stored", [4], tier="host")]
    await pub.publish_once()
    assert device(index, [1, 2, 3]) == 2
    assert index.lookup("m", "L", [1, 2, 4]).matches[0].host_blocks == 3
    index.forget("w1")  # e.g. the worker's lease lapsed for a moment
    await pub.publish_once()  # the heartbeat is refused, the reset follows at once
    assert pub.resyncs == 1
    assert device(index, [1, 2]) == 2
    assert index.lookup("m", "L", [1, 2, 4]).matches[0].host_blocks == 3


@pytest.mark.asyncio
async def test_store_blocks_are_forgotten_when_the_store_is_lost(served) -> None:
    index, engine, pub = served
    engine.events = [Ev("stored", [1]), Ev("stored", [7, 8], tier="store")]
    await pub.publish_once()
    assert index.store_blocks == 2
    index.store_lost()  # mooncake_master restarted
    await pub.publish_once()  # learns the new store epoch
    assert pub.mirror.tiers["store"] == set()
    index.forget("w1")
    await pub.publish_once()  # a resync does not bring the lost STORE blocks back
    assert index.store_blocks == 0 and device(index, [1]) == 1
