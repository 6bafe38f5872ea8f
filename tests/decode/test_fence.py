"""The decode side's FenceKVPush call: only a refused connection proves the writer gone; a
process that accepts connections and never answers (stopped) is not an answer."""

from __future__ import annotations

import socket
import time

import grpc
import pytest

from services.decode.fence import WriterGone, grpc_fence

pytestmark = pytest.mark.asyncio


async def test_a_refused_connection_means_the_writer_is_gone() -> None:
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WriterGone):
        await grpc_fence(call_s=5)(f"127.0.0.1:{port}", "r", time.time())


async def test_a_writer_that_never_answers_is_not_gone() -> None:
    # The kernel accepts the connection of a stopped process; nothing ever answers.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await grpc_fence(call_s=0.5)(f"127.0.0.1:{s.getsockname()[1]}", "r", time.time())
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
