"""A listener that accepts connections and never reads or answers: what a probe meets at a
SIGSTOPped process (the kernel completes the handshake from the backlog, nothing replies)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """Yield the port of a 127.0.0.1 listener that accepts and holds every connection
    without a byte in reply; everything is closed on exit."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield silent.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        for s in held:
            s.close()
        silent.close()
