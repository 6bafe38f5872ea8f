"""services/common/event_loop.py: the processes' loop is uvloop unless turned off, and gRPC's
asyncio stack runs on it (the router and workers talk gRPC from that loop)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import uvloop

from services.common import event_loop
from services.common.grpc_utils import SERVER_OPTIONS, insecure_channel


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert issubclass(event_loop.run(_loop_type()), uvloop.Loop)


def test_empty_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, " ")
    assert issubclass(event_loop.run(_loop_type()), uvloop.Loop)


def test_asyncio_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert not issubclass(event_loop.run(_loop_type()), uvloop.Loop)


def test_bad_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "tokio")
    with pytest.raises(ValueError, match="auto, uvloop or asyncio"):
        event_loop.run(_loop_type())


async def _grpc_round_trip() -> list[bytes]:
    """A unary-stream call between a grpc.aio server and client on the running loop."""

    async def stream(request: bytes, context: grpc.aio.ServicerContext):  # noqa: ANN202
        for i in range(3):
            yield request + bytes([i])

    handler = grpc.method_handlers_generic_handler(
        "t.S", {"M": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_stream("/t.S/M")(b"x", timeout=10)
            return [m async for m in call]
    finally:
        await server.stop(None)


def test_grpc_runs_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "uvloop")
    assert event_loop.run(_grpc_round_trip()) == [b"x\x00", b"x\x01", b"x\x02"]
