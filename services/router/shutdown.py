"""The router's graceful shutdown: on SIGTERM the requests in flight get ``grace_s`` to finish;
those still running then end with a 503 in their API's format (an error event on a stream)
instead of uvicorn cancelling them into a plain-text 500 or a stream cut without an end."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator
from typing import TypeVar

from services.router.errors import APIError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Default seconds the requests in flight get after SIGTERM (RouterConfig.shutdown_grace_s).
# NOTE: uvicorn's own hard limit is the grace + SHUTDOWN_MARGIN_S (time to write the 503s);
# `epdserve up` waits stop_wait_s for a router, the chart's router pods get the grace plus
# router.terminationGraceExtraSeconds: both outlast uvicorn's limit.
SHUTDOWN_GRACE_S = 10.0
SHUTDOWN_MARGIN_S = 3.0


def uvicorn_limit_s(grace_s: float) -> int:
    """uvicorn's timeout_graceful_shutdown (whole seconds) for a grace of ``grace_s``."""
    return math.ceil(grace_s + SHUTDOWN_MARGIN_S)


def stop_wait_s(grace_s: float) -> float:
    """How long a parent waits for a SIGTERMed router before SIGKILL: past uvicorn's limit,
    with 2 s to close its gRPC channels and etcd client."""
    return uvicorn_limit_s(grace_s) + 2.0


def shutting_down_error() -> APIError:
    return APIError(
        503,
        "the router is shutting down and ended this request; retry it",
        code="router_shutting_down",
    )


class Shutdown:
    """Begun once, when uvicorn starts its shutdown (main.GatewayServer); after ``grace_s``
    every request still waiting on its workers in ``guard`` gets ``shutting_down_error``.

    NOTE: a request is interrupted by cancelling its task while it waits for a worker
    message inside ``guard`` (nothing is checked per message: no cost while serving); one
    between messages (writing to its client) sees the flag at its next message."""

    def __init__(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self.grace_s = grace_s
        self.begun_at: float | None = None  # time.monotonic() of the signal
        self.expired = False
        self._waiting: set[asyncio.Task] = set()  # tasks inside guard's wait for a message

    @property
    def closing(self) -> bool:
        return self.begun_at is not None

    def begin(self) -> None:
        """Start the grace period (on the event loop); twice is once."""
        if self.begun_at is not None:
            return
        self.begun_at = time.monotonic()
        log.warning("shutting down: requests in flight have %.0f s to finish", self.grace_s)
        asyncio.get_running_loop().call_later(self.grace_s, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self._waiting:
            log.warning("shutdown grace over: ending %d request(s) with a 503", len(self._waiting))
        for task in list(self._waiting):
            task.cancel(msg="router_shutting_down")

    async def guard(self, stream: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """``stream``'s items until the grace runs out, then ``shutting_down_error``; closing
        this closes ``stream`` (which cancels its RPCs on the workers)."""
        try:
            while True:
                if self.expired:
                    raise shutting_down_error()
                # NOTE: the task is looked up at each wait: a stream's first message is
                # awaited by another task than the rest (serving.py).
                task = asyncio.current_task()
                assert task is not None
                self._waiting.add(task)
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError as exc:
                    # Ours (the grace ran out), or the caller's (client gone, task cancelled).
                    if exc.args != ("router_shutting_down",) or task.cancelling() != 1:
                        raise
                    task.uncancel()
                    raise shutting_down_error() from None
                finally:
                    self._waiting.discard(task)
                yield item
        finally:
            await stream.aclose()
