"""A Reserve refused for lack of KV space is backpressure, not a failure: RESOURCE_EXHAUSTED
with "retry later" and the failure kind ``busy``; the same Reserve succeeds once space frees.
A real engine (tiny model, 8 KV blocks) behind the real worker servicer and decode role."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio

from services.common.grpc_utils import (
    FAILURE_BUSY,
    SERVER_OPTIONS,
    failure_kind,
    insecure_channel,
)
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.decode.kv_receiver import KVReceiver
from services.decode.role import DecodeRole
from services.engine.async_engine import AsyncLLMEngine
from services.engine.config import EngineConfig
from services.worker.server import WorkerServicer
from services.worker.state import WorkerState

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]

BS = 4
NUM_BLOCKS = 8


@pytest_asyncio.fixture
async def stub(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    engine = AsyncLLMEngine(
        EngineConfig(model=model, dtype="float32", block_size=BS, kv_cache_bytes=1 << 20)
    )
    await engine.start()
    block_bytes = engine.engine.runner.bytes_per_block
    await engine.shutdown()
    engine = AsyncLLMEngine(
        EngineConfig(
            model=model, dtype="float32", block_size=BS, kv_cache_bytes=NUM_BLOCKS * block_bytes
        )
    )
    await engine.start()
    # A released reservation's blocks stay quarantined until its deadline plus the grace.
    receiver = KVReceiver(
        engine, engine.engine.runner.layout, reserve_timeout_s=3, write_grace_s=0.2
    )
    receiver.start()
    servicer = WorkerServicer(
        engine, WorkerState("d", "inc", "decode"), decode=DecodeRole(engine, receiver, "session")
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.WorkerServiceStub(channel)
    servicer.closing.set()
    await channel.close()
    await server.stop(grace=None)
    await receiver.stop()
    await engine.shutdown()


def reserve(rid: str, n: int) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        request_id=rid,
        prompt_token_ids=list(range(100, 100 + n)),
        params=pb.SamplingParams(max_tokens=4),
    )


async def test_reserve_without_space_says_retry_later(stub) -> None:
    first = await stub.Reserve(reserve("a", 20), timeout=10)  # 5 of the 8 blocks
    assert len(first.block_ids) == 5
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Reserve(reserve("b", 16), timeout=10)  # 4 blocks: 3 are free
    err = ei.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry later" in err.details()
    assert failure_kind(err) == FAILURE_BUSY
    # A prompt that could never fit is a bad request, not backpressure.
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Reserve(reserve("c", 32), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await stub.Release(pb.ReleaseRequest(request_id="a"), timeout=10)).found
    # Retried later (as the message says), it succeeds once a's blocks are free again.
    for _ in range(150):
        try:
            res = await stub.Reserve(reserve("b", 16), timeout=10)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the Reserve never succeeded")
    assert len(res.block_ids) == 4


async def test_bad_ids_in_reserve_and_decode_are_invalid_argument(stub) -> None:
    """Ids outside the vocabulary and a malformed image grid are the caller's error
    (INVALID_ARGUMENT), found before anything is claimed: a Decode whose first token is
    outside the vocabulary leaves its reservation, which a correct Decode then runs. It was
    INTERNAL after a failed forward pass (and the grid an UNKNOWN RuntimeError)."""
    bad = [reserve("oov", 8), reserve("grid", 8)]
    bad[0].prompt_token_ids[3] = 49152
    bad[1].images.add(hash="0" * 64, grid_thw=[4])
    for request in bad:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.Reserve(request, timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    await stub.Reserve(reserve("d", 8), timeout=10)
    for token in (49152, -1):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            async for _ in stub.Decode(pb.DecodeRequest(request_id="d", first_token_id=token)):
                pass
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
        assert "first_token_id" in ei.value.details()
    outputs = [r async for r in stub.Decode(pb.DecodeRequest(request_id="d", first_token_id=5))]
    assert outputs[-1].finished and outputs[0].outputs[0].token_ids[0] == 5
