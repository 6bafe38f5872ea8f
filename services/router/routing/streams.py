"""Streams of one request: n > 1 split into single completions and merged back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from services.common.proto import worker_pb2 as pb

QUEUED_PER_STREAM = 2


def child_params(params: pb.SamplingParams, i: int) -> pb.SamplingParams:
    """Completion ``i`` of an n > 1 request as a request of its own, seeded like the
    engine seeds its i-th child."""
    sub = pb.SamplingParams()
    sub.CopyFrom(params)
    sub.n = 1
    if params.HasField("seed"):
        # NOTE: wrapped into the wire's int64; torch seeds modulo 2**64, so the child draws
        # what the engine's own i-th child (sequence.py) draws from the unwrapped sum.
        sub.seed = (params.seed + i * 1_000_003 + 2**63) % 2**64 - 2**63
    return sub


async def merge_children(
    streams: Sequence[AsyncGenerator[pb.GenerateResponse, None]], indexes: Sequence[int]
) -> AsyncGenerator[pb.GenerateResponse, None]:
    """Merge single-completion streams back into one, each delta with its completion's
    index; ``finished`` once every stream has finished."""
    running = len(streams)
    async for i, msg in merge_streams(streams):
        for d in msg.outputs:
            d.index = indexes[i]
        running -= msg.finished
        msg.finished = running == 0
        yield msg


async def merge_streams(
    streams: Sequence[AsyncGenerator[pb.GenerateResponse, None]],
) -> AsyncGenerator[tuple[int, pb.GenerateResponse], None]:
    """Interleave several request streams as (stream index, message); cancels all on exit."""
    if len(streams) == 1:
        try:
            async for msg in streams[0]:
                yield 0, msg
        finally:
            # Close the inner generator now (not at GC): that cancels its RPC on the worker.
            await streams[0].aclose()
        return
    # Bounded: a stream is read at most QUEUED_PER_STREAM messages ahead of the consumer (the
    # client's HTTP writes), so a slow client slows the workers' streams through their flow
    # control (gRPC's window, the mux's credits) instead of the router queueing every
    # message of every choice.
    queue: asyncio.Queue[tuple[int, pb.GenerateResponse | None | BaseException]] = asyncio.Queue(
        QUEUED_PER_STREAM * len(streams)
    )

    async def pump(i: int, it: AsyncIterator[pb.GenerateResponse]) -> None:
        try:
            async for msg in it:
                await queue.put((i, msg))
            await queue.put((i, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                raise  # the consumer left: nobody reads the queue, a put could wait forever
            # NOTE: a stream's own CancelledError (its call cancelled elsewhere) is handed on too.
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
