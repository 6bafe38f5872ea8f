"""GET /v1/models and /v1/models/{id}: one shape both SDKs read (OpenAI's model object with
Anthropic's ModelInfo fields), and JSON errors for paths and methods the gateway lacks."""

from __future__ import annotations

import datetime
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.router.errors import APIError
from services.router.gateway import Gateway


def wants_anthropic(request: Request) -> bool:
    """The Anthropic SDK sends ``anthropic-version`` on every call; the OpenAI SDK never."""
    return "anthropic-version" in request.headers


def _card(gw: Gateway, name: str, max_len: int, parent: str | None = None) -> dict[str, Any]:
    created = datetime.datetime.fromtimestamp(gw.started_at, datetime.UTC)
    card: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": gw.started_at,
        "owned_by": "epdserve",
        "max_model_len": max_len,
        # Anthropic's ModelInfo (the anthropic SDK's models.list / retrieve validate these).
        "type": "model",
        "display_name": name,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "lifecycle": "active",
        "max_input_tokens": max_len,
        "max_tokens": max_len,
    }
    if parent is not None:
        card["parent"] = parent  # a LoRA adapter's base model (vLLM's field)
    return card


def _cards(gw: Gateway) -> list[dict[str, Any]]:
    # A model whose only workers are restarting is listed: requests for it wait for them,
    # and clients that check /v1/models first would fail on an empty list.
    models = gw.served_models()
    data = [_card(gw, name, max_len) for name, max_len in sorted(models.items())]
    data += [
        _card(gw, name, models.get(parent, 0), parent)
        for name, parent in sorted(gw.pool.adapters().items())
        if name not in models
    ]
    return data


async def list_models(gw: Gateway, request: Request) -> Response:
    data = _cards(gw)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            # Anthropic's page fields: every model fits on one page.
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


async def retrieve_model(gw: Gateway, request: Request) -> Response:
    """One model (OpenAI ``models.retrieve``, Anthropic ``models.retrieve``); ids may hold
    slashes (``org/name`` served names)."""
    name = request.path_params["model_id"]
    for card in _cards(gw):
        if card["id"] == name:
            return JSONResponse(card)
    raise APIError(404, f"The model '{name}' does not exist", param="model",
                   code="model_not_found")  # fmt: skip


async def no_route(request: Request, exc: Exception) -> Response:
    """A path or method the gateway does not serve: a JSON error in the caller's API format
    (Starlette's default is a plain-text body no SDK parses)."""
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    what = "Invalid URL" if status == 404 else "Method not allowed"
    err = APIError(status, f"{what} ({request.method} {request.url.path})")
    response = err.anthropic_response() if wants_anthropic(request) else err.openai_response()
    if isinstance(exc, HTTPException) and exc.headers:  # a 405's Allow
        response.headers.update(exc.headers)
    return response
