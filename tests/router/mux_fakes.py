"""A WorkerServicer on a FakeEngine behind a real gRPC server, with one handle that makes a
call per request and one that shares a GenerateMux stream (test_worker_mux*.py)."""

from __future__ import annotations

from typing import Any

import grpc
from router_fakes import FakeEngine

from services.common.grpc_utils import SERVER_OPTIONS, failure_kind
from services.common.membership import InstanceInfo
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.engine.sampling_params import SamplingParams
from services.router.routing.retry import worker_died
from services.router.routing.workers import WorkerHandle
from services.worker.server import WorkerServicer
from services.worker.state import WorkerState


def gen_request(
    rid: str, max_tokens: int = 3, *, epoch: int = 0, logprobs: int = 0
) -> pb.GenerateRequest:
    """A greedy Generate request of a two-token prompt."""
    params = pb.SamplingParams(temperature=0, max_tokens=max_tokens)
    if logprobs:
        params.logprobs = logprobs
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=[1, 2], params=params,
                              role_epoch=epoch)  # fmt: skip


async def outcome(call: Any) -> tuple[list[Any], Any]:
    """A call's messages (token ids and finish of each output), and its error's code,
    details, failure kind and whether it reads as the worker's death (None: it ended OK)."""
    got = []
    try:
        async for m in call:
            got.append([(list(o.token_ids), o.finish_reason) for o in m.outputs])
        return got, None
    except grpc.aio.AioRpcError as exc:
        return got, (exc.code(), exc.details(), failure_kind(exc), worker_died(exc))


class FakeDecode:
    """A decode role's reserve / claim over the fake engine (no KV transfer): a reserved
    request decodes ``max_tokens`` tokens."""

    def __init__(self, engine: FakeEngine, max_tokens: int = 3) -> None:
        self.engine = engine
        self.max_tokens = max_tokens
        self.reserved: set[str] = set()

    def held(self) -> set[str]:
        return self.reserved

    async def reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        self.reserved.add(request.request_id)
        return pb.ReserveResponse()

    def decode(self, request: pb.DecodeRequest) -> Any:
        self.reserved.remove(request.request_id)  # KeyError: the servicer's NOT_FOUND
        params = SamplingParams(max_tokens=self.max_tokens)
        return self.engine.generate(request.request_id, [1], params)


class Worker:
    """The servicer (role ``mixed``, or ``decode`` over a FakeDecode), its server, and two
    handles to it: ``plain`` (a call each) and ``muxed`` (the shared stream)."""

    def __init__(self, step_s: float = 0.002, role: str = "mixed", max_model_len: int = 128):
        self.engine = FakeEngine(step_s=step_s, max_model_len=max_model_len)
        self.state = WorkerState("w0", "inc-w0", role)
        self.fake_decode = FakeDecode(self.engine) if role == "decode" else None
        self.servicer = WorkerServicer(self.engine, self.state, load_interval_ms=50,
                                       decode=self.fake_decode)  # type: ignore[arg-type]  # fmt: skip
        self.streams = 0  # GenerateMux calls the server saw
        self.sends = self.frames = 0  # messages it sent on them, and the frames in those
        mux = self.servicer.GenerateMux

        async def counted(frames: Any, context: Any) -> Any:
            self.streams += 1
            async for batch in mux(frames, context):
                self.sends += 1
                self.frames += len(batch.frames)
                yield batch

        self.servicer.GenerateMux = counted  # type: ignore[method-assign]
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_WorkerServiceServicer_to_server(self.servicer, self.server)
        self.role = role

    async def start(self) -> None:
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        info = InstanceInfo(
            id="w0", address=f"127.0.0.1:{port}", role=self.role, role_epoch=1, model="m",
            incarnation="i", pid=1, host="h", capacity={},
        )  # fmt: skip
        self.plain = WorkerHandle(info, load_interval_ms=50, stale_s=5.0)
        self.muxed = WorkerHandle(info, load_interval_ms=50, stale_s=5.0, mux=True)

    async def stop(self) -> None:
        await self.server.stop(grace=None)
        await self.plain.channel.close(grace=None)
        await self.muxed.channel.close(grace=None)
