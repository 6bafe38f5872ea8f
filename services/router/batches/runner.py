"""One batch line through the router's serving pipeline, in process: the line's body goes to
the same endpoint handler a client's request reaches (``api/openai.py``, ``api/anthropic.py``,
``api/responses.py`` and from there ``serving.py``), as offline work, and its response is recorded as it was
written."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.types import Message

from services.router.api import anthropic as anthropic_api
from services.router.api import openai as openai_api
from services.router.api import responses as responses_api
from services.router.batches.records import LineResult

if TYPE_CHECKING:
    from services.router.gateway import Gateway

# Answers that say "not now" rather than "this request is bad": the line is tried again later
# instead of being recorded (offline work waits for room; it never takes an online 429).
RETRY_STATUSES = frozenset({429, 503})


def offline(body: dict[str, Any]) -> dict[str, Any]:
    """The body of a batch line as offline work.

    NOTE: the one place where a batch line gets its service tier: ``flex`` (offline), the
    value both gateways read (router/tiers.py: OpenAI's own name; on the Anthropic API an
    epdserve extension kept for this runner). The request carries no API key, so no key's
    tier limit applies; the key was checked when the batch was created."""
    return {**body, "service_tier": "flex", "stream": False}


def _request(path: str, body: bytes) -> Request:
    """An HTTP request as the handler sees it: ``body``, and a client that never leaves (the
    executor cancels the task instead)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # NOTE: the "disconnect" never comes
        raise AssertionError("unreachable")

    scope = {
        "type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
        "query_string": b"", "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }  # fmt: skip
    return Request(scope, receive)


async def run_line(gw: Gateway, endpoint: str, custom_id: str, body: dict[str, Any]) -> LineResult:
    """Send one line to ``endpoint``'s handler; its answer (status, JSON body)."""
    request = _request(endpoint, json.dumps(offline(body)).encode())
    if endpoint == "/v1/messages":
        response = await anthropic_api.handle(gw, request)
    elif endpoint == "/v1/responses":
        response = await responses_api.create(gw, request)
    else:
        response = await openai_api.handle(gw, request, chat=endpoint == "/v1/chat/completions")
    rid = f"batch_req_{uuid.uuid4().hex}"
    raw = bytes(getattr(response, "body", b""))
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return LineResult(custom_id, 0, rid, None,
                          {"code": "server_error", "message": "no JSON response"})  # fmt: skip
    return LineResult(custom_id, response.status_code, rid, payload)
