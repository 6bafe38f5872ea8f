"""The gateway's HTTP/1.1 protocol: uvicorn's httptools one with a bound on a request's head.

uvicorn's h11 protocol refuses a head (request line and headers) past 16 KiB; its httptools
protocol, the one it picks when httptools is installed (a dependency since the gateway moved
to it for its lower CPU per request), has no bound: httptools buffers a header until its end,
so one connection sending an endless header held all of it in the router's memory (200 MiB
in a test, growing as long as the client sent). This subclass answers 431 and closes the
connection once a head passes ``MAX_HEAD_BYTES``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Largest request head (request line + headers) accepted: h11's default bound is 16 KiB,
# nginx's 4 x 8 KiB; an API key, a trace context and cookies fit many times over.
MAX_HEAD_BYTES = 64 * 1024
LINGER_S = 2.0  # a refused connection's input is read and dropped this long at most

_BODY = json.dumps(
    {
        "error": {
            "message": f"request headers larger than {MAX_HEAD_BYTES} bytes",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
).encode()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that refuses a request head larger than ``MAX_HEAD_BYTES``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the parser is inside a request head (or before one)
        self._head_bytes = 0  # bytes received while it was
        self._head_began = False  # a new head began inside the last chunk
        self._refused = False  # answered 431: input is dropped until the connection closes
        self._linger: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # dropped: the connection is closing
        self._head_began = False
        super().data_received(data)
        # NOTE: a chunk in which the previous request ended is not counted (it may be mostly
        # that request's body), so a head is refused within one read (<= 256 KiB) of the bound.
        if not self._in_head or self._head_began or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse()

    def _refuse(self) -> None:
        """Answer 431 and end the connection. NOTE: closing a socket with unread input makes
        the kernel reset it, and a client still sending would lose the answer: the rest of
        the input is read and dropped, the answer followed by an end of stream, and the
        socket closed after ``LINGER_S`` (or when the client closes it)."""
        self.logger.warning("Request head over %d bytes: refused.", MAX_HEAD_BYTES)
        self._refused = True
        transport = self.transport
        transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(_BODY)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + _BODY
        )
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._head_began = True, 0, True
        super().on_message_complete()
