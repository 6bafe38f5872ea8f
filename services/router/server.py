"""The HTTP gateway: a starlette app over the router's worker pool, policy and tokenizer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common.grpc_utils import ROLES
from services.common.membership import MembershipWatcher
from services.common.tracing import Tracing
from services.router import anthropic_api, openai_api, tokenize_api
from services.router.admin import admin_routes, load_admin_token
from services.router.admission import AdmissionControl
from services.router.auth import check_api_key, load_api_keys
from services.router.config import RouterConfig
from services.router.errors import APIError, ClientDisconnected
from services.router.kv_index import KVIndexClient
from services.router.leader import LeaderElection
from services.router.metrics import API_OF_PATH, RouterMetrics
from services.router.offload import Offload
from services.router.openapi import openapi_document
from services.router.orchestrator import Orchestrator
from services.router.phases import RouterPhases, mark_arrival
from services.router.poison import PoisonTracker
from services.router.policies.factory import create_policy
from services.router.rebalancer import Rebalancer
from services.router.role_store import RoleStore
from services.router.workers import WorkerPool

log = logging.getLogger(__name__)


class Gateway:
    """Everything one router process holds; the HTTP handlers receive it."""

    def __init__(self, cfg: RouterConfig, tokenizer: Any) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.metrics = RouterMetrics()
        self.tracing = Tracing(cfg.otlp_traces_endpoint, "epdserve-router")
        self.pool = WorkerPool(
            cfg.load_report_interval_ms, cfg.load_stale_s, cfg.request_timeout_s, cfg.grpc_tls
        )
        self.policy = create_policy(cfg.policy)
        self.kv_index = KVIndexClient(cfg.etcd_endpoints, cfg.cluster, cfg.grpc_tls)
        self.orchestrator = Orchestrator(
            self.pool,
            self.policy,
            cfg.request_timeout_s,
            cfg.max_attempts,
            max_migrations=cfg.max_migrations,
            stall_timeout_s=cfg.stall_timeout_s,
            on_migration=lambda reason: self.metrics.migrations.labels(reason).inc(),
            kv_index=self.kv_index,
            poison=PoisonTracker(cfg.poison_max_deaths),
            phases=RouterPhases(self.metrics, self.tracing),
        )
        self.watcher = MembershipWatcher(cfg.etcd_endpoints, cfg.cluster)
        self.watcher.add_listener(self.pool.on_membership)
        self.started_at = int(time.time())
        self.admin_token = load_admin_token(cfg.admin_token_file)
        self.api_keys = load_api_keys(cfg.api_keys_file)  # NOTE: never logged
        self.admission = AdmissionControl(cfg.max_queued_tokens)
        # Tokenization, chat templates and grammar checks of requests, off the event loop.
        self.offload = Offload(cfg.preprocess_threads)
        # This replica's name among several routers (the leader election's candidate name).
        self.identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.rebalancer = Rebalancer(
            self.pool, RoleStore(cfg.etcd_endpoints, cfg.cluster), self.metrics.rebalance,
            LeaderElection(cfg.etcd_endpoints, cfg.cluster, self.identity),
            cfg.rebalance_policy, cfg.rebalance_param_dict, cfg.governor_config,
            cfg.rebalance_interval_s,
        )  # fmt: skip

    async def start(self) -> None:
        await self.watcher.start()
        await self.kv_index.start()
        await self.rebalancer.start()

    async def stop(self) -> None:
        await self.rebalancer.stop()
        await self.watcher.stop()
        await self.kv_index.stop()
        await self.pool.close()
        await asyncio.to_thread(self.tracing.shutdown)
        self.offload.close()

    def resolve_model(self, name: str, serving: bool = True) -> tuple[str, int]:
        """(served name, context length) for a requested model, or 404 / 503; ``serving``:
        some worker must be usable for it too (not needed only to tokenize)."""
        models = self.pool.models()
        if not models:
            raise APIError(503, "no workers available", code="no_workers")
        if name not in models:
            raise APIError(
                404, f"The model '{name}' does not exist; available: {', '.join(sorted(models))}",
                param="model", code="model_not_found",
            )  # fmt: skip
        # NOTE: a worker out of routing only for a moment still counts (the orchestrator
        # waits a little for it): with the only other one just died, that is no 503.
        if serving and not self.can_serve(name) and not self.pool.may_serve(name):
            raise APIError(503, f"no usable worker for model '{name}'", code="no_workers")
        return name, models[name]

    def can_serve(self, model: str | None = None) -> bool:
        """A mixed worker, or a prefill + decode pair, is usable for ``model``."""
        pool = self.pool
        return bool(pool.candidates("mixed", model)) or (
            bool(pool.candidates("prefill", model)) and bool(pool.candidates("decode", model))
        )

    def healthy(self) -> bool:
        return self.can_serve()


def _guard(
    fn: Callable[[Gateway, Request], Awaitable[Response]],
    anthropic: bool = False,
    auth: bool = True,
) -> Callable[[Request], Awaitable[Response]]:
    """Errors in the API's own format; with ``auth``, the API key is checked first."""

    async def endpoint(request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        mark_arrival()  # the request's queue phase starts (phases.py)
        try:
            if auth:
                check_api_key(gw.api_keys, request)
            return await fn(gw, request)
        except ClientDisconnected:
            if request.url.path in API_OF_PATH:
                gw.metrics.count_request(API_OF_PATH[request.url.path], 499)
            return Response(status_code=499)  # nobody reads it; the request was aborted
        except APIError as err:
            return err.anthropic_response() if anthropic else err.openai_response()
        except Exception as exc:
            log.exception("unhandled error in %s", request.url.path)
            internal = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
            return internal.anthropic_response() if anthropic else internal.openai_response()

    return endpoint


async def _chat(gw: Gateway, request: Request) -> Response:
    return await openai_api.handle(gw, request, chat=True)


async def _completions(gw: Gateway, request: Request) -> Response:
    return await openai_api.handle(gw, request, chat=False)


async def _models(gw: Gateway, request: Request) -> Response:
    data = [
        {
            "id": name,
            "object": "model",
            "created": gw.started_at,
            "owned_by": "epdserve",
            "max_model_len": max_len,
        }  # fmt: skip
        for name, max_len in sorted(gw.pool.models().items())
    ]
    return JSONResponse({"object": "list", "data": data})


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
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def build_app(gateway: Gateway) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        Route("/v1/chat/completions", _guard(_chat), methods=["POST"]),
        Route("/v1/completions", _guard(_completions), methods=["POST"]),
        Route("/v1/messages", _guard(anthropic_api.handle, anthropic=True), methods=["POST"]),
        Route(
            "/v1/messages/count_tokens",
            _guard(anthropic_api.count_tokens, anthropic=True),
            methods=["POST"],
        ),
        Route("/tokenize", _guard(tokenize_api.tokenize), methods=["POST"]),
        Route("/detokenize", _guard(tokenize_api.detokenize), methods=["POST"]),
        Route("/v1/models", _guard(_models), methods=["GET"]),
        # NOTE: probes and scrapers carry no API key; /admin checks its own token.
        Route("/health", _guard(_health, auth=False), methods=["GET"]),
        Route("/metrics", _guard(_metrics, auth=False), methods=["GET"]),
        Route("/openapi.json", _guard(_openapi, auth=False), methods=["GET"]),
        *admin_routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    return app
