"""Which gRPC status (code, details, failure kind) each WorkerService call ends with for each
kind of exception its engine or role raises: the router's retry decisions read these, so a
restructure of the servicer must keep every row. A real gRPC server on 127.0.0.1 in front of
the real servicer; the engine and the roles are fakes that raise."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio

from services.common.grpc_utils import SERVER_OPTIONS, failure_kind, insecure_channel
from services.common.mooncake_agent import TransferError
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.engine.distributed import RankFailure
from services.engine.outputs import RequestFailedError
from services.worker.server import WorkerServicer
from services.worker.state import WorkerState

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

Code = grpc.StatusCode
INVALID = (Code.INVALID_ARGUMENT, "", None)
ENGINE = (Code.UNAVAILABLE, "engine failed: ", "engine")
REQUEST = (Code.INTERNAL, "request r1 failed on worker w: ", "request")
UNKNOWN = (Code.UNKNOWN, None, None)  # not mapped: the exception propagates

# call -> exception class -> (status code, details prefix, failure kind)
EXPECTED = {
    "Generate": {
        ValueError: INVALID, TypeError: REQUEST, MemoryError: REQUEST, TransferError: ENGINE,
        RuntimeError: ENGINE, RequestFailedError: REQUEST, KeyError: REQUEST,
    },
    "Prefill": {
        ValueError: INVALID, TypeError: INVALID, MemoryError: REQUEST,
        TransferError: (Code.UNAVAILABLE, "KV transfer failed: ", "transfer"),
        RuntimeError: ENGINE, RequestFailedError: REQUEST, KeyError: REQUEST,
    },
    "Reserve": {
        ValueError: INVALID, TypeError: INVALID,
        MemoryError: (Code.RESOURCE_EXHAUSTED, "decode worker full, retry later: ", "busy"),
        TransferError: UNKNOWN, RuntimeError: UNKNOWN, RequestFailedError: UNKNOWN,
        KeyError: UNKNOWN,
    },
    "Encode": {
        ValueError: INVALID, TypeError: UNKNOWN, MemoryError: UNKNOWN,
        TransferError: (Code.UNAVAILABLE, "encoder failed: ", None),
        RuntimeError: (Code.UNAVAILABLE, "encoder failed: ", None),
        RequestFailedError: UNKNOWN, KeyError: UNKNOWN,
    },
    "LoadLoRA": {
        ValueError: INVALID, KeyError: (Code.NOT_FOUND, "no LoRA adapter ", None),
        # A tensor-parallel rank failed to read it (no rank holds it: lora_manager.py).
        RankFailure: (Code.UNAVAILABLE, "LoRA adapter not loaded: ", None),
        RuntimeError: UNKNOWN,
    },
}  # fmt: skip
ROLE_OF = {"Generate": "mixed", "Prefill": "prefill", "Reserve": "decode", "Encode": "encode",
           "LoadLoRA": "mixed"}  # fmt: skip


class Raising:
    """The engine and every role at once: each of their calls raises ``exc``."""

    model_name = "m"
    max_model_len = 64

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def generate(self, *args, **kwargs):
        async def outputs():
            raise self.exc
            yield  # an async generator, as the engine's

        return outputs()

    async def abort(self, rid: str) -> None:
        pass

    async def call(self, fn):  # LoadLoRA
        raise self.exc

    async def run(self, request, prompt):  # PrefillRole
        raise self.exc

    async def reserve(self, request):  # DecodeRole
        raise self.exc

    async def encode(self, request):  # EncodeRole
        raise self.exc


@pytest_asyncio.fixture
async def worker():
    servers = []

    async def start(call: str, exc: Exception):
        fake = Raising(exc)
        state = WorkerState("w", "inc", ROLE_OF[call])
        servicer = WorkerServicer(fake, state, prefill=fake, decode=fake)  # type: ignore[arg-type]
        servicer.encoder = fake  # type: ignore[assignment]
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_WorkerServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = insecure_channel(f"127.0.0.1:{port}")
        servers.append((server, channel))
        return pb_grpc.WorkerServiceStub(channel), state

    yield start
    for server, channel in servers:
        await channel.close()
        await server.stop(grace=None)


async def _call(stub: pb_grpc.WorkerServiceStub, call: str) -> None:
    if call == "Generate":
        async for _ in stub.Generate(pb.GenerateRequest(request_id="r1"), timeout=10):
            pass
    elif call == "Prefill":
        await stub.Prefill(pb.PrefillRequest(request_id="r1"), timeout=10)
    elif call == "Reserve":
        await stub.Reserve(pb.ReserveRequest(request_id="r1"), timeout=10)
    elif call == "LoadLoRA":
        await stub.LoadLoRA(pb.LoadLoRARequest(name="a", path="/adapters/a"), timeout=10)
    else:
        await stub.Encode(pb.EncodeRequest(request_id="r1"), timeout=10)


@pytest.mark.parametrize("call", sorted(EXPECTED))
async def test_each_exception_ends_the_call_with_its_status(worker, call: str) -> None:
    for cls, (code, prefix, kind) in EXPECTED[call].items():
        exc = cls("boom")
        stub, state = await worker(call, exc)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _call(stub, call)
        err = ei.value
        assert err.code() == code, (cls, err.details())
        if prefix is not None:
            assert err.details() == f"{prefix}{exc}", cls
        assert failure_kind(err) == kind, cls
        # Whatever the failure, the request leaves the in-flight set (a stream's cleanup may
        # finish just after its status reached the client).
        await asyncio.wait_for(state.idle.wait(), 5)
        assert state.inflight == set(), cls
