"""The gateway's uvicorn settings (router/main.py server_config): a request head past
http_protocol.MAX_HEAD_BYTES is refused (431) before it fills the router's memory, and
ordinary heads and large bodies on a kept-alive connection are not; a head or a body slower
than --http-head-timeout-s / --http-body-timeout-s is refused (408) while a long response is
never cut; connections past --http-max-connections get 503."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn

from services.common import event_loop
from services.router.config import RouterConfig
from services.router.http_protocol import CLIENT_GONE, MAX_HEAD_BYTES
from services.router.main import server_config
from tests.waits import until

GONE: list[str] = []  # requests of ``_app`` that saw their client leave


async def _app(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
    """Answers each request with the size of its headers and its body."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/gone":  # starts a response, then waits for the client to leave
        left = asyncio.Event()
        scope["extensions"][CLIENT_GONE].add(left.set)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await asyncio.wait_for(left.wait(), 10)
        GONE.append(scope["path"])
        return
    if scope["path"] == "/gone-before":  # starts waiting only once the client has left
        while (await receive())["type"] != "http.disconnect":
            pass
        told: list[bool] = []
        scope["extensions"][CLIENT_GONE].add(lambda: told.append(True))
        GONE.append(scope["path"] if told else "/gone-before: not told")
        return
    if scope["path"] == "/stream":  # a response of 1.5 s, longer than the tests' read timeouts
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(6):
            await asyncio.sleep(0.25)
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
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


@contextlib.asynccontextmanager
async def _serving(**limits: object) -> AsyncIterator[int]:
    """The gateway's uvicorn settings around ``_app``, on a free port (yielded), stopped
    after the block."""
    cfg = RouterConfig(host="127.0.0.1", port=0, **limits)  # type: ignore[arg-type]
    server = uvicorn.Server(server_config(_app, cfg, "error"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), task
            await asyncio.sleep(0.02)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def _ask(port: int, raw: bytes) -> tuple[int, bytes]:
    """The answer to ``raw`` sent on a connection of its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await _response(reader)
    finally:
        writer.close()


async def _scenario() -> dict[str, object]:
    out: dict[str, object] = {}
    async with _serving() as port:
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
        # A client that leaves while its request waits: the request is told (CLIENT_GONE).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /gone HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        await until(lambda: GONE, timeout=10, what="the request told of its client gone")
        # A client that left before its request started waiting (a request still reading,
        # tokenizing, waiting for its model): it is told when it starts.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /gone-before HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
        writer.close()
        await until(lambda: len(GONE) > 1, timeout=10, what="the request that started late")
        out["gone"] = list(GONE)
    return out


def test_request_head_is_bounded() -> None:
    out = event_loop.run(_scenario())
    assert out["big_header"][0] == 200 and int(out["big_header"][1].split()[0]) > 32 << 10
    headers = len(b"hostxcontent-length1048576")
    assert out["big_body"] == (200, b"%d %d" % (headers, 1 << 20))
    status, body = out["huge"]
    assert status == 431, (status, body)
    assert str(MAX_HEAD_BYTES).encode() in body and b'"error"' in body
    assert out["gone"] == ["/gone", "/gone-before"]


async def _slow_heads() -> list[tuple[int, bytes]]:
    out = []
    async with _serving(http_head_timeout_s=0.5) as port:
        # A head that stops halfway, and a connection that sends nothing: each held its
        # connection for good (no answer within 10 s on the old protocol).
        for start in (b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: a", b""):
            out.append(await _ask(port, start))
    return out


def test_a_slow_request_head_times_out() -> None:
    for status, body in event_loop.run(_slow_heads()):
        assert status == 408 and b"not received in 0.5 s" in body, (status, body)


async def _slow_body_and_long_stream() -> dict[str, object]:
    out: dict[str, object] = {}
    async with _serving(http_head_timeout_s=0.5, http_body_timeout_s=0.5) as port:
        # A body a byte every 0.1 s (slowloris): each read comes well within any idle timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
        answer = asyncio.ensure_future(_response(reader))
        for _ in range(30):  # 3 s at most, then the client stops sending
            if answer.done() or writer.is_closing():
                break
            writer.write(b"b")
            await asyncio.sleep(0.1)
        out["slow_body"] = await answer
        writer.close()
        # A response of 1.5 s (three body timeouts) with a POST pipelined behind it: neither is
        # cut, the pipelined body waits for the stream and is then read.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n"
                     b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc")  # fmt: skip
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        out["stream_status"] = int(head.split(b" ", 2)[1])
        chunks = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
        out["stream_bytes"] = chunks.count(b"x")
        out["pipelined"] = await _response(reader)
        writer.close()
    return out


def test_a_slow_request_body_times_out_and_a_long_response_does_not() -> None:
    """The old protocol read a body a byte at a time for as long as the client sent it (no
    answer within 10 s here); reading a request is bounded, a response never is."""
    out = event_loop.run(_slow_body_and_long_stream())
    status, body = out["slow_body"]
    assert status == 408 and b"body not received in 0.5 s" in body, (status, body)
    assert out["stream_status"] == 200 and out["stream_bytes"] == 6
    assert out["pipelined"][0] == 200 and out["pipelined"][1].endswith(b" 3")


async def _connection_limit() -> dict[str, object]:
    out: dict[str, object] = {}
    async with _serving(http_max_connections=3) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        out["fourth"] = await _ask(port, b"")  # answered before it sends anything
        _, w0 = held.pop()
        w0.close()
        await asyncio.sleep(0.2)  # the server sees it gone
        out["after_one_closed"] = await _ask(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        for _, w in held:
            w.close()
    return out


def test_connections_past_the_limit_get_503() -> None:
    """Idle connections held file descriptors without bound (the router had no limit)."""
    out = event_loop.run(_connection_limit())
    status, body = out["fourth"]
    assert status == 503 and b"more than 3 connections" in body, (status, body)
    assert out["after_one_closed"][0] == 200


async def _malformed(requests: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    async with _serving() as port:
        for raw in requests:
            out.append(await _ask(port, raw))
        # The server still serves a good request after them.
        out.append(await _ask(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"))
    return out


def test_malformed_requests_get_400_in_the_apis_format() -> None:
    """Requests httptools refuses: uvicorn answered a text/plain line ('Invalid HTTP request
    received.'), not the API's JSON error; now the gateway's JSON error, then the close."""
    head = b"POST / HTTP/1.1\r\nhost: x\r\n"
    chunked = head + b"transfer-encoding: chunked\r\n\r\n"
    bad = [
        chunked + b"-5\r\nabcde\r\n0\r\n\r\n",  # negative chunk size
        chunked + b"zz\r\nabcde\r\n0\r\n\r\n",  # not hexadecimal
        chunked + b"ffffffffffffffffffff\r\nab\r\n0\r\n\r\n",  # past 64 bits
        head + b"content-length: 5\r\ncontent-length: 7\r\n\r\nabcdefg",
        head + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    *answers, good = event_loop.run(_malformed(bad))
    for status, body in answers:
        assert status == 400 and b'"error"' in body and b"invalid HTTP request" in body, body
    assert good[0] == 200


def test_idle_connections_outlast_the_clients_expiry() -> None:
    """uvicorn's default 5 s equals the idle expiry of httpx and of the OpenAI and Anthropic
    SDKs: a client reusing its connection as the gateway closed it got 'Connection reset by
    peer' (1 of 150 requests ~5 s apart; a POST is not retried). The gateway keeps idle
    connections well past every common client's expiry (aiohttp's: 15 s)."""
    import anthropic._constants
    import httpx
    import openai._constants

    expiries = [httpx.Limits().keepalive_expiry, 15.0,
                openai._constants.DEFAULT_CONNECTION_LIMITS.keepalive_expiry,
                anthropic._constants.DEFAULT_CONNECTION_LIMITS.keepalive_expiry]  # fmt: skip
    config = server_config(_app, RouterConfig(host="127.0.0.1", port=0), "error")
    assert config.timeout_keep_alive >= 2 * max(e or 0.0 for e in expiries), expiries


async def _timers_of_whole_requests() -> list[float]:
    """The timers the gateway's protocol arms over three requests, each sent whole in one
    write on one kept-alive connection."""
    from services.router import http_protocol

    armed: list[float] = []

    class Counting:  # the protocol's loop, counting its call_later
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self._loop = loop

        def __getattr__(self, name: str) -> object:
            return getattr(self._loop, name)

        def call_later(self, delay: float, *args: object) -> asyncio.TimerHandle:
            armed.append(delay)
            return self._loop.call_later(delay, *args)

    init = http_protocol.BoundedHttpToolsProtocol.__init__

    def counting_init(self, *args: object, **kwargs: object) -> None:  # noqa: ANN001
        init(self, *args, **kwargs)
        self.loop = Counting(self.loop)

    http_protocol.BoundedHttpToolsProtocol.__init__ = counting_init  # type: ignore[method-assign]
    try:
        async with _serving(http_head_timeout_s=7.0, http_body_timeout_s=9.0) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(3):
                writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
                assert (await _response(reader))[0] == 200
            writer.close()
    finally:
        http_protocol.BoundedHttpToolsProtocol.__init__ = init  # type: ignore[method-assign]
    return armed


def test_a_request_sent_whole_arms_no_timer() -> None:
    """A request whose head and body come in one read arms no head or body timer (each was
    armed and cancelled within that read: four libuv timers a request): only the new
    connection's wait for its first head is armed (uvicorn's keep-alive timer, 75 s, is its own)."""
    armed = event_loop.run(_timers_of_whole_requests())
    assert [d for d in armed if d in (7.0, 9.0)] == [7.0], armed
