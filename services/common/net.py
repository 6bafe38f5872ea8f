"""Small networking helpers: free loopback ports, waiting for a TCP listener, and HTTP
requests to this machine's own processes."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the usual race applies; callers retry on clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """True once something accepts TCP connections on host:port, False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def open_direct(
    url: str | urllib.request.Request, timeout: float, context: ssl.SSLContext | None = None
) -> http.client.HTTPResponse:
    """``urllib.request.urlopen`` that never goes through a proxy: for processes this one
    started (etcd, routers), which a proxy named in ``http_proxy`` cannot reach (urllib sends
    even 127.0.0.1 to it unless ``no_proxy`` says otherwise)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers).open(url, timeout=timeout)
