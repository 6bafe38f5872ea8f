"""The admin API's poison calls (``epdserve poison``): the request fingerprints this router
refuses as poison and for how long, and forgetting them once the workers' logs are read
(routing/poison.py). NOTE: each router judges and refuses on its own: ask each one."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.routing import Route

from services.router.api.admin import AdminError, _guard

if TYPE_CHECKING:
    from services.router.gateway import Gateway

log = logging.getLogger(__name__)

# A fingerprint as the poison error names it (poison.fingerprint: 16 bytes in hex).
FINGERPRINT = re.compile(r"[0-9a-f]{32}")


async def _refusals(gw: Gateway, request: Request) -> dict[str, Any]:
    poison = gw.orchestrator.poison
    refused = {fp: round(s, 1) for fp, s in poison.refusals().items()}
    return {"refused": refused, "max_deaths": poison.max_deaths, "ttl_s": poison.ttl_s}


async def _forget(gw: Gateway, request: Request) -> dict[str, Any]:
    fp = request.path_params.get("fingerprint")
    if fp is not None and not FINGERPRINT.fullmatch(fp):
        raise AdminError(400, f"not a request fingerprint: {fp!r} (32 hex digits)", "bad_request")
    forgotten = gw.orchestrator.poison.forget(fp)
    log.warning("admin: poison refusals forgotten (%s): %d", fp or "all", forgotten)
    return {"forgotten": forgotten}


def poison_routes() -> list[Route]:
    return [
        Route("/admin/poison", _guard(_refusals), methods=["GET"]),
        Route("/admin/poison", _guard(_forget), methods=["DELETE"]),
        Route("/admin/poison/{fingerprint}", _guard(_forget), methods=["DELETE"]),
    ]
