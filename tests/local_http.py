"""A plain HTTP server on 127.0.0.1 in a thread of the test, for the tests that stand a
small hand-written peer up (an image host, an OTLP collector, a fake router)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that does not print a line per request."""

    def log_message(self, *args: object) -> None:
        pass


def base_url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@contextlib.contextmanager
def local_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    """Serve `handler` on a free 127.0.0.1 port until the block ends. The test may shut the
    server down earlier itself (a peer that stops answering); shutting down twice is fine."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
