"""The HTTP app: the routes of the gateway, each endpoint guarded (API key, errors in its
API's format), and the small endpoints (models, health, metrics, OpenAPI)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from services.common.grpc_utils import ROLES
from services.router.api import anthropic as anthropic_api
from services.router.api import batches as batches_api
from services.router.api import message_batches
from services.router.api import models as models_api
from services.router.api import openai as openai_api
from services.router.api import pooling as pooling_api
from services.router.api import responses as responses_api
from services.router.api import tokenize as tokenize_api
from services.router.api.admin import admin_routes
from services.router.api.admin_models import model_routes
from services.router.api.admin_poison import poison_routes
from services.router.api.lora import lora_routes
from services.router.api.openapi import openapi_document
from services.router.auth import check_api_key
from services.router.batches.service import BatchService
from services.router.errors import APIError, ClientDisconnected
from services.router.gateway import Gateway
from services.router.metrics import API_OF_PATH
from services.router.phases import mark_arrival

log = logging.getLogger(__name__)


def _guard(
    fn: Callable[[Gateway, Request], Awaitable[Response]],
    anthropic: bool | None = False,
    auth: bool = True,
) -> Callable[[Request], Awaitable[Response]]:
    """Errors in the API's own format (``anthropic`` None: the caller's, from its headers);
    with ``auth``, the API key is checked first."""

    async def endpoint(request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        mark_arrival()  # the request's queue phase starts (phases.py)
        fmt = models_api.wants_anthropic(request) if anthropic is None else anthropic
        try:
            if auth:
                request.state.api_key = check_api_key(gw.api_keys, request)
            return await fn(gw, request)
        except ClientDisconnected:
            if request.url.path in API_OF_PATH:
                gw.metrics.count_request(API_OF_PATH[request.url.path], 499)
            return Response(status_code=499)  # nobody reads it; the request was aborted
        except APIError as err:
            return err.anthropic_response() if fmt else err.openai_response()
        except Exception as exc:
            log.exception("unhandled error in %s", request.url.path)
            internal = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
            return internal.anthropic_response() if fmt else internal.openai_response()

    return endpoint


async def _chat(gw: Gateway, request: Request) -> Response:
    return await openai_api.handle(gw, request, chat=True)


async def _completions(gw: Gateway, request: Request) -> Response:
    return await openai_api.handle(gw, request, chat=False)


async def _health(gw: Gateway, request: Request) -> Response:
    """Ready or not, and how many workers of each role there are and can serve.

    NOTE: no API key is needed (probes carry none), so nothing here names a worker or its
    address: ``/admin/health`` (admin token) has the per-worker details."""
    now = time.monotonic()
    roles = {role: {"workers": 0, "ready": 0} for role in ROLES}
    for h in gw.pool.handles.values():
        count = roles.setdefault(h.info.role, {"workers": 0, "ready": 0})
        count["workers"] += 1
        count["ready"] += int(h.usable_for(h.info.role, now))
    body = {
        "status": "ok" if gw.healthy() else "unavailable",
        "workers": sum(c["workers"] for c in roles.values()),
        "ready": sum(c["ready"] for c in roles.values()),
        "roles": roles,
    }
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


async def _openapi(gw: Gateway, request: Request) -> Response:
    return JSONResponse(openapi_document())


async def _metrics(gw: Gateway, request: Request) -> Response:
    gw.metrics.update_pool(gw.pool)
    gw.metrics.update_offline(gw.offline)
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _batch_routes() -> list[Route]:
    """The OpenAI Files + Batch APIs and the Anthropic Message Batches API."""
    b, m = batches_api, message_batches

    def anthropic(fn: Callable[[Gateway, Request], Awaitable[Response]]) -> Callable:
        return _guard(fn, anthropic=True)

    return [
        Route("/v1/files", _guard(b.create_file), methods=["POST"]),
        Route("/v1/files", _guard(b.list_files), methods=["GET"]),
        Route("/v1/files/{file_id}", _guard(b.get_file), methods=["GET"]),
        Route("/v1/files/{file_id}", _guard(b.delete_file), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", _guard(b.file_content), methods=["GET"]),
        Route("/v1/batches", _guard(b.create_batch), methods=["POST"]),
        Route("/v1/batches", _guard(b.list_batches), methods=["GET"]),
        Route("/v1/batches/{batch_id}", _guard(b.get_batch), methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", _guard(b.cancel_batch), methods=["POST"]),
        Route("/v1/messages/batches", anthropic(m.create), methods=["POST"]),
        Route("/v1/messages/batches", anthropic(m.list_batches), methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}", anthropic(m.retrieve), methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}/cancel", anthropic(m.cancel), methods=["POST"]),
        Route("/v1/messages/batches/{batch_id}/results", anthropic(m.results), methods=["GET"]),
    ]


class HotRoutes:
    """The gateway's ASGI app: a POST to one of ``hot`` (the generation endpoints) runs its
    endpoint directly, everything else goes through ``app``, the Starlette app with all routes.
    Starlette's error and exception middlewares, its router's matching and its request wrapper
    are about 60 Python calls a request; the endpoints answer their own errors (``_guard``),
    which is all those layers did for them. Attributes (``state``, ``routes``) are the app's."""

    def __init__(
        self, app: Starlette, hot: dict[str, Callable[[Request], Awaitable[Response]]]
    ) -> None:
        self.app = app
        self.hot = hot

    def __getattr__(self, name: str) -> object:
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            endpoint = self.hot.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self.app  # what Starlette sets (request.app.state.gateway)
                response = await endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(gateway: Gateway) -> HotRoutes:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        batches = app.state.batches = BatchService(gateway)
        await batches.start()
        try:
            yield
        finally:
            await batches.stop()
            await gateway.stop()

    hot = {
        "/v1/chat/completions": _guard(_chat),
        "/v1/completions": _guard(_completions),
        "/v1/messages": _guard(anthropic_api.handle, anthropic=True),
    }
    routes = [
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in hot.items()),
        Route(
            "/v1/messages/count_tokens",
            _guard(anthropic_api.count_tokens, anthropic=True),
            methods=["POST"],
        ),
        Route("/v1/responses", _guard(responses_api.create), methods=["POST"]),
        Route(
            "/v1/responses/{response_id}", _guard(responses_api.stored), methods=["GET", "DELETE"]
        ),  # fmt: skip
        Route(
            "/v1/responses/{response_id}/input_items",
            _guard(responses_api.list_input_items),
            methods=["GET"],
        ),
        Route(
            "/v1/responses/{response_id}/cancel", _guard(responses_api.cancel), methods=["POST"]
        ),  # fmt: skip
        Route("/v1/embeddings", _guard(pooling_api.embeddings), methods=["POST"]),
        Route("/v1/rerank", _guard(pooling_api.rerank), methods=["POST"]),
        Route("/v2/rerank", _guard(pooling_api.rerank), methods=["POST"]),
        Route("/v1/score", _guard(pooling_api.score), methods=["POST"]),
        Route("/tokenize", _guard(tokenize_api.tokenize), methods=["POST"]),
        Route("/detokenize", _guard(tokenize_api.detokenize), methods=["POST"]),
        Route("/v1/models", _guard(models_api.list_models, anthropic=None), methods=["GET"]),
        Route(
            "/v1/models/{model_id:path}",
            _guard(models_api.retrieve_model, anthropic=None),
            methods=["GET"],
        ),
        # NOTE: probes and scrapers carry no API key; /admin checks its own token.
        Route("/health", _guard(_health, auth=False), methods=["GET"]),
        Route("/metrics", _guard(_metrics, auth=False), methods=["GET"]),
        Route("/openapi.json", _guard(_openapi, auth=False), methods=["GET"]),
        *_batch_routes(),
        *admin_routes(),
        *model_routes(),
        *poison_routes(),
        *lora_routes(),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan,
        exception_handlers={404: models_api.no_route, 405: models_api.no_route},
    )  # fmt: skip
    app.state.gateway = gateway
    return HotRoutes(app, hot)
