"""The gateway's uvicorn settings (router/main.py server_config): a request head past
http_protocol.MAX_HEAD_BYTES is refused (431) before it fills the router's memory, and
ordinary heads and large bodies on a kept-alive connection are not; a head slower than
HEAD_TIMEOUT_S is refused (408)."""

from __future__ import annotations

import asyncio

import uvicorn

from services.common import event_loop
from services.router import http_protocol
from services.router.config import RouterConfig
from services.router.http_protocol import MAX_HEAD_BYTES
from services.router.main import server_config


async def _app(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
    """Answers each request with the size of its headers and its body."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    size = sum(len(k) + len(v) for k, v in scope["headers"])
    out = f"{size} {len(body)}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(out)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": out})


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))  # fmt: skip
    return status, await asyncio.wait_for(reader.readexactly(length), 10)


async def _serve() -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    """The gateway's uvicorn settings around ``_app``, started on a free port."""
    server = uvicorn.Server(server_config(_app, RouterConfig(host="127.0.0.1", port=0), "error"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), task
        await asyncio.sleep(0.02)
    return server, task, server.servers[0].sockets[0].getsockname()[1]


async def _scenario() -> dict[str, object]:
    server, task, port = await _serve()
    out: dict[str, object] = {}
    try:
        # Two requests on one connection: a 32 KiB header, then a 1 MiB body.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (32 << 10) + b"\r\n\r\n")
        out["big_header"] = await _response(reader)
        body = b"b" * (1 << 20)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body))
        writer.write(body)
        out["big_body"] = await _response(reader)
        writer.close()
        # A 1 MiB header: refused once past the bound, the answer read while the client is
        # still sending (the old protocol read it all and answered 200).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-huge: ")
        for _ in range(16):
            writer.write(b"a" * (64 << 10))
            await writer.drain()
        writer.write(b"\r\n\r\n")
        await writer.drain()
        out["huge"] = await _response(reader)
        writer.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
    return out


def test_request_head_is_bounded() -> None:
    out = event_loop.run(_scenario())
    assert out["big_header"][0] == 200 and int(out["big_header"][1].split()[0]) > 32 << 10
    headers = len(b"hostxcontent-length1048576")
    assert out["big_body"] == (200, b"%d %d" % (headers, 1 << 20))
    status, body = out["huge"]
    assert status == 431, (status, body)
    assert str(MAX_HEAD_BYTES).encode() in body and b'"error"' in body


async def _slow_heads() -> list[tuple[int, bytes]]:
    server, task, port = await _serve()
    out = []
    try:
        # A head that stops halfway, and a connection that sends nothing: each held its
        # connection for good (no answer within 10 s on the old protocol).
        for start in (b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: a", b""):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(start)
            out.append(await _response(reader))
            writer.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
    return out


def test_a_slow_request_head_times_out(monkeypatch) -> None:
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT_S", 0.5)
    for status, body in event_loop.run(_slow_heads()):
        assert status == 408 and b"not received in 0.5 s" in body, (status, body)
