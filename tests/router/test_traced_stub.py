"""The router's stub of a worker (phases.TracedStub) costs a call of a request no more asyncio
work than a plain stub when nothing records it: the grpc.aio client interceptors it replaces
ran every call's start in a Task and its status in another."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from fake_handles import TaskCount

from services.common.grpc_utils import SERVER_OPTIONS, insecure_channel
from services.common.membership import InstanceInfo
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.router.phases import RouterPhases
from services.router.routing.workers import WorkerHandle


class ThreeSteps(pb_grpc.WorkerServiceServicer):
    async def Generate(self, request: Any, context: Any) -> Any:  # noqa: N802
        for i in range(3):
            yield pb.GenerateResponse(prompt_tokens=i)


def test_a_request_call_starts_no_more_tasks_than_a_plain_stub() -> None:
    async def main() -> tuple[int, int]:
        count = TaskCount()
        loop = asyncio.get_running_loop()
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_WorkerServiceServicer_to_server(ThreeSteps(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        info = InstanceInfo(
            id="w0", address=f"127.0.0.1:{port}", role="mixed", role_epoch=1, model="m",
            incarnation="i", pid=1, host="h", capacity={},
        )  # fmt: skip
        handle = WorkerHandle(info, load_interval_ms=50, stale_s=5.0)
        plain_channel = insecure_channel(info.address)
        plain = pb_grpc.WorkerServiceStub(plain_channel)
        try:

            async def tasks_of(stub: Any) -> int:
                RouterPhases().begin("r", "m")  # a request is current: the call is its own
                count.started = 0
                got = [m async for m in stub.Generate(pb.GenerateRequest(), timeout=10)]
                assert [m.prompt_tokens for m in got] == [0, 1, 2]
                return count.started

            await tasks_of(plain)  # both channels connected before counting
            await tasks_of(handle.stub)
            loop.set_task_factory(count)
            return await tasks_of(plain), await tasks_of(handle.stub)
        finally:
            loop.set_task_factory(None)
            await plain_channel.close()
            await handle.channel.close()
            await server.stop(None)

    plain_tasks, traced_tasks = asyncio.run(main())
    assert traced_tasks == plain_tasks, (plain_tasks, traced_tasks)
