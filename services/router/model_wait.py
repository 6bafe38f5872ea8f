"""A completion refused for a model in passing is tried again once the model serves.

A request routed to a worker just before that worker began draining (a leader's model swap
puts it to sleep, an operator sleeps it or flips its role) is refused by it; with no other
worker of the model the orchestrator then raises a 503 ``model_unavailable`` (or
``model_asleep``). Nothing reached the client yet, so the request goes back to waiting for
its model as a new one does (``Gateway.resolve_awake``: counted on the waiting board, so the
leader wakes the model) and runs again, within RETRY_WINDOW_S. A refusal seen before the
router learns of the drain is a ``no_workers`` 503 for a moment: it counts as passing when
the drain shows within ``SETTLE_S``.

A ``no_workers`` refusal for a name the router's view no longer knows at all (a LoRA adapter
unloaded between the request's resolution and its routing: the reports that listed it are
gone) is the 404 ``model_not_found`` a new request for it gets, not a 503 inviting a retry
that can only be refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.routing.unavailable import in_transition

if TYPE_CHECKING:
    from services.router.gateway import Gateway

log = logging.getLogger(__name__)

PASSING = frozenset({"model_unavailable", "model_asleep"})
RETRY_WINDOW_S = 15.0  # from the first refusal; each wait for the model is bounded itself
SETTLE_S = 1.0  # how long a no_workers refusal may take to show as a drain in etcd
POLL_S = 0.1


async def _passing(gw: Gateway, model: str, err: APIError) -> bool:
    """Whether ``err`` is a refusal for a model in transition (waiting up to SETTLE_S for a
    drain to show in the router's view, for a no_workers one)."""
    if err.status != 503:
        return False
    if err.code in PASSING:
        return True
    if err.code != "no_workers":
        return False
    settle = time.monotonic() + SETTLE_S
    while time.monotonic() < settle:
        if in_transition(gw.pool, model) or gw.pool.asleep(model):
            return True
        await asyncio.sleep(POLL_S)
    return False


def _raise_if_unknown(gw: Gateway, model: str) -> None:
    """The 404 ``model_not_found`` when the router's view no longer knows ``model``."""
    try:
        gw.resolve_model(model, serving=False)
    except APIError as err:
        if err.status == 404:
            raise err from None


async def until_served(
    gw: Gateway, model: str, start: Callable[[], AsyncGenerator[pb.GenerateResponse, None]]
) -> AsyncGenerator[pb.GenerateResponse, None]:
    """``start()``'s messages; when it fails before its first one because ``model`` is in
    passing, wait for the model (``resolve_awake``, which raises the 503 itself when the
    model does not come back in its bound) and start again."""
    deadline = time.monotonic() + RETRY_WINDOW_S
    while True:
        started = False
        try:
            async with aclosing(start()) as stream:
                async for msg in stream:
                    started = True
                    yield msg
            return
        except APIError as err:
            if not started and err.status == 503 and err.code == "no_workers":
                _raise_if_unknown(gw, model)
            if started or time.monotonic() >= deadline or not await _passing(gw, model, err):
                raise
            log.info("request for %s refused by a worker going away (%s); waiting for the "
                     "model to serve again", model, err.code)  # fmt: skip
        await gw.resolve_awake(model)
