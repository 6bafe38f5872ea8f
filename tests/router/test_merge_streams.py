"""merge_streams / merge_children (services/router/routing/streams.py): n > 1 choices and
several prompts merged into one stream, read no further ahead of the consumer than a few
messages a stream, so that a slow client slows the workers' streams (their flow control)."""

from __future__ import annotations

import asyncio

import pytest

from services.common.proto import worker_pb2 as pb
from services.router.routing.streams import QUEUED_PER_STREAM, merge_children, merge_streams


def stream(n: int, produced: list[int], k: int, fail_at: int | None = None):
    async def gen():
        for j in range(n):
            if j == fail_at:
                raise RuntimeError(f"stream {k} broke")
            produced[k] += 1
            yield pb.GenerateResponse(
                outputs=[pb.CompletionDelta(token_ids=[j])], finished=j == n - 1
            )
            await asyncio.sleep(0)

    return gen()


def test_a_slow_consumer_holds_the_streams_back() -> None:
    async def main() -> None:
        produced = [0, 0, 0]
        consumed = 0
        merged = merge_streams([stream(200, produced, k) for k in range(3)])
        async for _, _msg in merged:
            consumed += 1
            await asyncio.sleep(0.001)  # the client's writes
            # NOTE: each stream may hold one message in its hand besides what is queued.
            assert sum(produced) - consumed <= (QUEUED_PER_STREAM + 1) * 3, (produced, consumed)
        assert consumed == 600 and produced == [200, 200, 200]

    asyncio.run(main())


def test_children_merge_with_their_indexes_and_finish_once() -> None:
    async def main() -> list[tuple[int, int, bool]]:
        produced = [0, 0]
        out = []
        async for msg in merge_children([stream(5, produced, 0), stream(7, produced, 1)], [3, 8]):
            out += [(d.index, d.token_ids[0], msg.finished) for d in msg.outputs]
        return out

    out = asyncio.run(main())
    assert [t for i, t, _ in out if i == 3] == list(range(5))
    assert [t for i, t, _ in out if i == 8] == list(range(7))
    assert [f for _, _, f in out] == [False] * 11 + [True]


def test_an_error_reaches_the_consumer_and_a_consumer_that_leaves_stops_the_pumps() -> None:
    async def failing() -> None:
        produced = [0, 0]
        async for _ in merge_streams(
            [stream(100, produced, 0), stream(100, produced, 1, fail_at=3)]
        ):
            await asyncio.sleep(0.001)

    with pytest.raises(RuntimeError, match="stream 1 broke"):
        asyncio.run(asyncio.wait_for(failing(), 30))

    async def leaving() -> list[int]:
        produced = [0, 0]
        merged = merge_streams([stream(10_000, produced, 0), stream(10_000, produced, 1)])
        async for _ in merged:
            break
        await asyncio.sleep(0.05)  # the pumps fill the queue and wait on it
        await merged.aclose()  # cancels the pumps, blocked on the full queue: must not hang
        return produced

    produced = asyncio.run(asyncio.wait_for(leaving(), 30))
    assert sum(produced) < 100


def test_a_stream_s_own_cancellation_reaches_the_consumer() -> None:
    """A stream may raise CancelledError itself (its gRPC call was cancelled elsewhere): that is
    the stream's outcome, handed to the consumer, not the pump's own cancellation (which would
    leave the consumer waiting for that stream's end forever)."""

    async def cancelled_call():
        yield pb.GenerateResponse(outputs=[pb.CompletionDelta(token_ids=[0])])
        raise asyncio.CancelledError

    async def main() -> None:
        async for _ in merge_streams([cancelled_call(), stream(3, [0, 0], 1)]):
            pass

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(asyncio.wait_for(main(), 30))
