"""Workers as the router sees them (WorkerHandle) with scripted stubs, for orchestrator unit
tests: no process, no socket (the channel is never used)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.common.membership import InstanceInfo
from services.common.proto import worker_pb2 as pb
from services.router import serving
from services.router.routing.workers import WorkerHandle, WorkerPool


def fake_handle(
    iid: str,
    stub: Any,
    role: str = "mixed",
    load: pb.LoadReport | None = None,
    rate: float = 0.0,
    stale_s: float = 5.0,
) -> WorkerHandle:
    """A worker of ``role`` answering through ``stub``, last reporting ``load`` (now), with
    a measured prefill ``rate`` (tokens/s; 0: none yet)."""
    info = InstanceInfo(
        id=iid, address=f"127.0.0.1:{9000 + len(iid)}", role=role, role_epoch=1, model="m",
        incarnation="i", pid=1, host="h", capacity={"max_model_len": 4096},
    )  # fmt: skip
    h = WorkerHandle(info, load_interval_ms=50, stale_s=stale_s)
    h.stub = stub
    h.load = load or pb.LoadReport()
    h.load_at = time.monotonic()
    if rate:
        h.prefill_rate.add(rate)
    return h


def fake_pool(handles: list[WorkerHandle], stale_s: float = 5.0) -> WorkerPool:
    pool = WorkerPool(stale_s=stale_s)
    pool.handles = {h.id: h for h in handles}
    return pool


async def keep_reporting(handles: list[WorkerHandle]) -> None:
    """The load streams of ``handles`` stay alive (a report every 50 ms) until cancelled."""
    while True:
        for h in handles:
            h.load_at = time.monotonic()
        await asyncio.sleep(0.05)


def rpc_error(code: grpc.StatusCode, details: str, kind: str | None = None) -> grpc.aio.AioRpcError:
    """A failed call as a worker sends it (``kind``: its failure-kind trailer)."""
    trailing = grpc.aio.Metadata(("epdserve-failure", kind)) if kind else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


class Unary:
    """A unary call: awaiting it runs ``fn`` (which returns the reply or raises)."""

    def __init__(self, fn: Callable[[], Awaitable[Any]]) -> None:
        self._fn = fn

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._fn().__await__()

    def cancel(self) -> None:
        pass


class Stream:
    """A server stream of ``messages``, each after ``delay`` seconds."""

    def __init__(self, messages: list[Any], delay: float = 0.0) -> None:
        self._messages = list(messages)
        self._delay = delay

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if not self._messages:
            raise StopAsyncIteration
        await asyncio.sleep(self._delay)
        return self._messages.pop(0)

    def cancel(self) -> None:
        pass


def finished(token: int = 7, prompt_tokens: int = 0) -> pb.GenerateResponse:
    """A one-token, finished response."""
    delta = pb.CompletionDelta(token_ids=[token], text="x", finish_reason="length")
    return pb.GenerateResponse(outputs=[delta], prompt_tokens=prompt_tokens, finished=True)


class TaskCount:
    """A task factory counting the tasks a loop starts (``loop.set_task_factory(count)``):
    the router's per-message paths must start none of their own."""

    def __init__(self) -> None:
        self.started = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        self.started += 1
        return asyncio.Task(coro, loop=loop, **kw)


def serve_request(model: str) -> serving.ServeRequest:
    """A one-prompt, one-token completions request for ``model``, as the gateway hands it to
    serving."""
    return serving.ServeRequest(
        api="completions", rid="r1", model=model, prompts=[[1, 2, 3]], images=[],
        params=pb.SamplingParams(max_tokens=1), n=1, logprobs=False, tools=None,
        tool_parser=None, reasoning=None, started=time.monotonic(),  # type: ignore[arg-type]
    )  # fmt: skip
