"""The floor of a gRPC hop on this machine: a bare grpc.aio echo of the worker's own messages.

A server in a process of its own (uvloop, the worker's SERVER_OPTIONS, no model, no
interceptor) answers at once; this process (uvloop, the router's CHANNEL_OPTIONS) times one
request at a time, three ways alternated in a seeded random order (as gateway_overhead.py):
  unary   Generate: a call of its own, one GenerateResponse back (the grpc arm's shape)
  mux     one MuxRequest frame on an open GenerateMux stream, one MuxFrames back (the shape
          of the router's requests with worker_mux on)
  thread  Generate whose answer waits for a thread woken by a threading.Event that hands it
          back with call_soon_threadsafe (the engine step thread's hand-off, without a step)
What gateway_overhead.py reads above these for its grpc and http_raw arms is not gRPC's own
price. Recorded, not asserted.

    python benchmarks/grpc_floor.py [--requests 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.common.grpc_io import use_poller_io  # noqa: E402

# Both sides run gRPC's I/O as the services do (common/grpc_io.py); `GRPC_EXPERIMENTS=` (set,
# empty) measures gRPC's default EventEngine instead.
use_poller_io()

import grpc  # noqa: E402

from benchmarks.http_client import emit, pct  # noqa: E402
from services.common import event_loop  # noqa: E402
from services.common.grpc_utils import SERVER_OPTIONS, insecure_channel  # noqa: E402
from services.common.proto import worker_pb2 as pb  # noqa: E402
from services.common.proto import worker_pb2_grpc as pb_grpc  # noqa: E402

HANDED = "handed"  # a Generate request with this id is answered through the hand-off thread


class Echo(pb_grpc.WorkerServiceServicer):
    """Answers Generate and GenerateMux at once; ``HANDED`` requests via a thread."""

    def __init__(self) -> None:
        self._handoffs: queue.Queue[tuple[asyncio.Future[None], asyncio.AbstractEventLoop]]
        self._handoffs = queue.Queue()
        self._wake = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:  # as AsyncLLMEngine._run waits for a command
        while True:
            self._wake.wait(0.05)
            self._wake.clear()
            while not self._handoffs.empty():
                fut, loop = self._handoffs.get_nowait()
                loop.call_soon_threadsafe(fut.set_result, None)

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:  # noqa: N802
        if request.request_id == HANDED:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._handoffs.put((fut, loop))
            self._wake.set()
            await fut
        yield pb.GenerateResponse(finished=True, prompt_tokens=len(request.prompt_token_ids))

    async def GenerateMux(self, frames, context) -> AsyncIterator[pb.MuxFrames]:  # noqa: N802
        async for frame in frames:
            done = pb.MuxResponse(id=frame.id, message=pb.GenerateResponse(finished=True),
                                  end=pb.MuxEnd())  # fmt: skip
            yield pb.MuxFrames(frames=[done])


async def serve() -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_WorkerServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


async def measure(port: int, requests: int) -> dict[str, Any]:
    frames: asyncio.Queue[pb.MuxRequest] = asyncio.Queue()

    async def outgoing() -> AsyncIterator[pb.MuxRequest]:
        while True:
            yield await frames.get()

    request = pb.GenerateRequest(prompt_token_ids=[1, 2, 3, 4, 5],
                                 params=pb.SamplingParams(temperature=0, max_tokens=1))  # fmt: skip
    handed = pb.GenerateRequest(request_id=HANDED)
    handed.MergeFrom(request)
    ids = iter(range(1, 10**9))
    async with insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.WorkerServiceStub(channel)
        mux = stub.GenerateMux(outgoing())
        replies = mux.__aiter__()

        async def unary() -> None:
            async for _ in stub.Generate(request, timeout=10):
                pass

        async def thread() -> None:
            async for _ in stub.Generate(handed, timeout=10):
                pass

        async def one_frame() -> None:
            frame = pb.MuxRequest(id=next(ids), start=request)
            frames.put_nowait(frame)
            await asyncio.wait_for(replies.__anext__(), 10)

        calls: dict[str, Callable[[], Awaitable[None]]] = {
            "unary": unary, "mux": one_frame, "thread": thread,
        }  # fmt: skip
        wall: dict[str, list[float]] = {name: [] for name in calls}
        order = random.Random(0)
        warm = max(20, requests // 10)
        for i in range(warm + requests):
            for name in order.sample(list(calls), len(calls)):
                t = time.perf_counter()
                await calls[name]()
                if i >= warm:
                    wall[name].append(time.perf_counter() - t)
        mux.cancel()
    report: dict[str, Any] = {"requests": requests, "load_average": round(os.getloadavg()[0], 2)}
    for name, vals in wall.items():
        report[name] = {f"p{q}_ms": round(pct(vals, q / 100) * 1e3, 3) for q in (50, 90, 99)}
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="requests of each variant")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server's side
    args = p.parse_args()
    if args.serve:
        event_loop.run(serve())
        return 0
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError("the echo server ended before it was ready")
        report = event_loop.run(measure(int(line.split()[1]), args.requests))
    finally:
        server.terminate()
        server.wait(10)
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
