"""The gateway's HTTP/1.1 protocol: uvicorn's httptools one with a bound on a request's head.

uvicorn's h11 protocol refuses a head (request line and headers) past 16 KiB; its httptools
protocol, the one it picks when httptools is installed (a dependency since the gateway moved
to it for its lower CPU per request), has no bound: httptools buffers a header until its end,
so one connection sending an endless header held all of it in the router's memory (200 MiB
in a test, growing as long as the client sent). This subclass answers 431 and closes the
connection once a head passes ``MAX_HEAD_BYTES``, and 408 when a head takes longer than
``HttpLimits.head_timeout_s`` to arrive (neither protocol of uvicorn bounds that time: a client
sending a header a byte at a time, or nothing after connecting, held its connection for good).

The same holds for a request's body (``body_timeout_s``, from the end of its head: a client
sending a body a byte every few seconds held its connection and buffer for good) and for the
number of connections (``max_connections``: past it a new connection gets 503 and is closed; the
router had no bound, so idle connections took file descriptors until accept() failed for all).
Only *reading a request* is timed: a response (a stream of minutes) is never cut.

A request's scope carries ``CLIENT_GONE``: callbacks called when its connection is lost, so
that a request waiting for its output notices a client gone with no task of its own watching
``receive()`` (accumulate.until_disconnect).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.router.http_limits import MAX_HEAD_BYTES, HttpLimits

LINGER_S = 2.0  # a refused connection's input is read and dropped this long at most
# The ASGI scope extension of a request served here: a ClientGone, whose callables (no
# argument) are called once when the connection is lost. The app adds one while it waits, and
# discards it.
CLIENT_GONE = "epdserve.client_gone"


class ClientGone:
    """The callbacks of a connection's requests, called once when it is lost. NOTE: one added
    after that is called at once: a request may start waiting after its client left (while
    it read its body, was tokenized, waited for its model), and would wait for nobody."""

    def __init__(self) -> None:
        self.lost = False
        self._callbacks: set[Callable[[], None]] = set()

    def add(self, callback: Callable[[], None]) -> None:
        if self.lost:
            callback()
        else:
            self._callbacks.add(callback)

    def discard(self, callback: Callable[[], None]) -> None:
        self._callbacks.discard(callback)

    def __len__(self) -> int:
        return len(self._callbacks)

    def connection_lost(self) -> None:
        self.lost = True
        callbacks, self._callbacks = self._callbacks, set()
        for callback in callbacks:
            callback()


def bounded_protocol(limits: HttpLimits) -> type[BoundedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with ``limits``."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})


def _error(message: str) -> bytes:
    """An OpenAI-format error body (the path, and so the API, is not known yet)."""
    body = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return json.dumps({"error": body}).encode()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that refuses a request head larger than ``MAX_HEAD_BYTES``, a head or
    body slower than its timeout, and connections past ``max_connections``."""

    limits = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the parser is inside a request head (or before one)
        self._head_bytes = 0  # bytes received while it was
        self._head_began = False  # a new head began inside the last chunk
        self._refused = False  # answered 431 or 408: input is dropped until the connection closes
        self._linger: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None  # while a head is awaited
        self._body_timer: asyncio.TimerHandle | None = None  # while a body is awaited
        self._gone = ClientGone()  # CLIENT_GONE of this connection's requests
        # Inside ``data_received``'s parse: a head's end or a body's wait is noted here and
        # its timer armed after the chunk, so a request whose chunk holds all of it (the
        # common case) arms and cancels no timer (four a request, each a libuv timer).
        self._parsing = False
        self._head_ended = False  # a head ended inside the chunk
        self._body_due = False  # a body is awaited past the chunk

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(b"503 Service Unavailable",
                         f"more than {self.limits.max_connections} connections open")  # fmt: skip
            return
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # dropped: the connection is closing
        # NOTE: the timers run from this chunk's arrival (a head) and from its head's end (a
        # body), as if armed then: the parse between takes microseconds.
        head_wait = self._in_head and self._head_timer is None
        self._head_began = self._head_ended = self._body_due = False
        self._parsing = True
        try:
            super().data_received(data)
        finally:
            self._parsing = False
        if not self._refused:
            if head_wait and not self._head_ended:
                self._head_timer = self.loop.call_later(self.limits.head_timeout_s,
                                                        self._head_timed_out)  # fmt: skip
            if self._body_due:
                self._body_timer = self.loop.call_later(self.limits.body_timeout_s,
                                                        self._body_timed_out)  # fmt: skip
        # NOTE: a chunk in which the previous request ended is not counted (it may be mostly
        # that request's body), so a head is refused within one read (<= 256 KiB) of the bound.
        if not self._in_head or self._head_began or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(
                b"431 Request Header Fields Too Large",
                f"request headers larger than {MAX_HEAD_BYTES} bytes",
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._refused or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is still running (the next head came pipelined): not its wait.
            self._head_timer = self.loop.call_later(self.limits.head_timeout_s,
                                                    self._head_timed_out)  # fmt: skip
            return
        self._refuse(b"408 Request Timeout",
                     f"request head not received in {self.limits.head_timeout_s:g} s")  # fmt: skip

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self._refused or self._in_head or self.transport.is_closing():
            return
        if self.pipeline or self.flow.read_paused:
            # Not read because a response before it still runs (pipelined), or because the
            # app has not taken what came: the wait is the server's, not the client's.
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s,
                                                    self._body_timed_out)  # fmt: skip
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()  # answered already: no second status line can follow
            return
        if cycle is not None:  # the app sees the client gone, and anything it sends is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        self._refuse(b"408 Request Timeout",
                     f"request body not received in {self.limits.body_timeout_s:g} s")  # fmt: skip

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse (a bad chunk size, two Content-Lengths, both
        Content-Length and chunked): 400 in the API's error format, not uvicorn's text/plain
        line, and the connection lingers so that a client still sending reads the answer."""
        self._refuse(b"400 Bad Request", f"invalid HTTP request: {msg}")

    def _refuse(self, status: bytes, message: str) -> None:
        """Answer ``status`` and end the connection. NOTE: closing a socket with unread input makes
        the kernel reset it, and a client still sending would lose the answer: the rest of
        the input is read and dropped, the answer followed by an end of stream, and the
        socket closed after ``LINGER_S`` (or when the client closes it)."""
        self.logger.warning("Request refused: %s.", message)
        self._refused = True
        transport, body = self.transport, _error(message)
        transport.write(
            b"HTTP/1.1 " + status + b"\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._linger, self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)
        self._gone.connection_lost()

    def on_headers_complete(self) -> None:
        self.scope.setdefault("extensions", {})[CLIENT_GONE] = self._gone
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        self._head_ended = True
        if self._parsing:
            self._body_due = True  # armed after the chunk unless the body ends in it
        else:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s,
                                                    self._body_timed_out)  # fmt: skip

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._head_began = True, 0, True
        self._body_due = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()
