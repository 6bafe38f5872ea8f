"""How much of the gateway one client may hold while it sends a request (no uvicorn import:
RouterConfig reads the defaults; http_protocol.py enforces them)."""

from __future__ import annotations

from dataclasses import dataclass

# Largest request head (request line + headers) accepted: h11's default bound is 16 KiB,
# nginx's 4 x 8 KiB; an API key, a trace context and cookies fit many times over.
MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0  # from a head's first byte (or the connection) to its end (nginx: 60)
# From a head's end to its body's end. NOTE: a total, not nginx's time between two reads (60 s),
# which a byte every few seconds never trips; 300 s reads a 64 MiB batch file at 220 KB/s.
BODY_TIMEOUT_S = 300.0
MAX_CONNECTIONS = 4096  # open connections at once (uvicorn and the router had no bound)
# How long an idle keep-alive connection stays open (nginx's default; uvicorn's is 5 s). NOTE:
# longer than clients keep a pooled connection (httpx and Node 5 s, aiohttp 15 s): a server that
# closes first races a client reusing it, which reads a reset. A router stopped for 5 s (SIGSTOP,
# a stalled host) closed every such connection on resume, under requests already sent on them:
# tests/chaos/test_chaos.py test_stop_router_replica. Idle ones count in MAX_CONNECTIONS.
KEEP_ALIVE_S = 75.0


@dataclass(frozen=True)
class HttpLimits:
    """What one client may hold of the gateway while it sends a request (RouterConfig's
    ``http_*`` fields); checked there."""

    head_timeout_s: float = HEAD_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
