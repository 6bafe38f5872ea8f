"""GenerateMux's worker side sends what is ready as one message, within a byte bound
(review6: an unbounded batch after a router stall could pass gRPC's 64 MiB message limit and
fail the whole shared stream, migrating every request on it)."""

from __future__ import annotations

import asyncio

from services.common.proto import worker_pb2 as pb
from services.worker import mux


def _frame(i: int) -> pb.MuxResponse:
    msg = pb.GenerateResponse(outputs=[pb.CompletionDelta(text="x" * 1000)])
    return pb.MuxResponse(id=i, message=msg)


def _drain(outbox: asyncio.Queue, max_bytes: int) -> tuple[list[list[int]], bool]:
    batches, ended = [], False
    while not ended and not outbox.empty():
        frames, ended = mux.take_ready(outbox, outbox.get_nowait(), max_bytes)
        if frames:
            batches.append([f.id for f in frames])
    return batches, ended


def test_a_backlog_goes_in_bounded_messages_in_order() -> None:
    outbox: asyncio.Queue = asyncio.Queue()
    for i in range(10):
        outbox.put_nowait(_frame(i))
    outbox.put_nowait(mux._END)
    size = _frame(0).ByteSize()
    batches, ended = _drain(outbox, 3 * size)
    assert ended
    assert [i for b in batches for i in b] == list(range(10))
    assert [len(b) for b in batches] == [3, 3, 3, 1]


def test_one_frame_over_the_bound_still_goes_and_the_end_alone_ends() -> None:
    outbox: asyncio.Queue = asyncio.Queue()
    for i in range(2):
        outbox.put_nowait(_frame(i))
    batches, ended = _drain(outbox, 10)
    assert batches == [[0], [1]] and not ended
    outbox.put_nowait(mux._END)
    assert _drain(outbox, 10) == ([], True)


def test_the_default_bound_is_far_under_the_message_limit() -> None:
    assert mux.MAX_BATCH_BYTES * 8 <= 64 * 1024 * 1024
