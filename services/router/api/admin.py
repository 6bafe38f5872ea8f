"""The router's admin API (``/admin/...``), used by the operator CLI (``epdserve status`` ...).

Every call needs ``Authorization: Bearer <admin token>``: a token separate from client API
keys, read from ``--admin-token-file`` or ``EPDSERVE_ADMIN_TOKEN``; with neither, the admin
API answers 403. Errors are JSON ``{"error": {"message", "code"}}``: 401 bad token, 404 unknown
worker, 400 bad role or parameters, 409 a change that would leave a role with no worker,
503 etcd (or, for a worker's own call, the worker) unreachable.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common.grpc_utils import ROLES, UNARY_TIMEOUT_S
from services.common.proto import worker_pb2 as pb
from services.router.auth import TOKEN_ENV
from services.router.rebalance.rebalancer import leaves_role_empty
from services.router.rebalance.role_store import RoleStoreError

if TYPE_CHECKING:
    from services.router.gateway import Gateway

log = logging.getLogger(__name__)

LIST_TIMEOUT_S = 2.0  # a worker that does not list its requests in time shows null
# A re-placement of experts reads them again from the checkpoint on every rank.
EXPERTS_TIMEOUT_S = 600.0


class AdminError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "code": self.code}}, status_code=self.status
        )


def _check_token(gw: Gateway, request: Request) -> None:
    expected = gw.admin_token
    if expected is None:
        raise AdminError(
            403, "admin API disabled: start the router with --admin-token-file or "
            f"{TOKEN_ENV}", "admin_disabled",
        )  # fmt: skip
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # NOTE: constant-time comparison; the header is never logged.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise AdminError(401, "missing or wrong admin token", "unauthorized")


def _guard(
    fn: Callable[[Gateway, Request], Awaitable[Any]],
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        try:
            _check_token(gw, request)
            result = await fn(gw, request)
            return result if isinstance(result, Response) else JSONResponse(result)
        except AdminError as err:
            return err.response()
        except RoleStoreError as exc:
            return AdminError(503, str(exc), "etcd_unavailable").response()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this call was cancelled: the client left, or the router stops
            # NOTE: a gRPC call whose channel closed under it (the worker's handle went: it
            # left, or registered again after a stop) raises CancelledError, not AioRpcError:
            # `epdserve models sleep` of a worker stopped mid-call answered 500.
            message = "the worker's connection closed during the call (it left or registered again)"
            return AdminError(503, message + "; retry", "worker_unavailable").response()
        except Exception as exc:
            log.exception("admin call %s failed", request.url.path)
            return AdminError(
                500, f"internal error: {type(exc).__name__}: {exc}", "internal"
            ).response()

    return endpoint


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested past ~1,000 levels
        raise AdminError(400, "request body is not JSON", "bad_request") from None
    if not isinstance(body, dict):
        raise AdminError(400, "request body must be a JSON object", "bad_request")
    return body


def _worker(gw: Gateway, worker_id: str):
    handle = gw.pool.handles.get(worker_id)
    if handle is None:
        known = ", ".join(sorted(gw.pool.handles)) or "none"
        raise AdminError(404, f"unknown worker {worker_id!r}; known: {known}", "unknown_worker")
    return handle


async def _list_requests(h) -> pb.ListRequestsResponse | None:
    """The requests a worker holds, or None when it cannot say (unreachable, too slow)."""
    if not h.reachable():
        return None
    try:
        return await h.stub.ListRequests(pb.ListRequestsRequest(), timeout=LIST_TIMEOUT_S)
    except Exception as exc:  # an old worker without the RPC, a dead one: status still answers
        log.debug("ListRequests on %s failed: %s", h.id, exc)
        return None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the status call itself was cancelled
        # NOTE: the worker left during the call and its channel closed under it (see
        # _guard): the whole status answered 503 while a worker was missing.
        return None


def allowed_roles(h) -> list[str]:
    """The roles a worker can take: PD roles need KV transfer; encode needs a vision-language
    model with Mooncake (the worker advertises ``capacity["encode"]``)."""
    pd = h.info.capacity.get("kv_transfer") != "none"
    return [
        r
        for r in ROLES
        if r == "mixed" or (pd and (r != "encode" or h.info.capacity.get("encode")))
    ]


def worker_status(
    h, desired: str | None, held: pb.ListRequestsResponse | None = None
) -> dict[str, Any]:
    r = h.load
    unreachable = not h.reachable() and h.info.state != "loading"
    return {
        "id": h.id,
        "address": h.info.address,
        "role": h.info.role,
        "desired_role": desired or h.info.role,
        "epoch": h.info.role_epoch,
        # A worker loading another model is unreachable while it restarts: it says "loading".
        "state": "unreachable" if unreachable else h.state,
        # Seconds since its latest sign of life, while unreachable (None: never heard from).
        "for_s": round(h.silence(time.monotonic()), 1) if unreachable and h.alive_at else None,
        "model": h.info.model,
        # Why its last model load failed (it serves its old model again: worker/model_load.py).
        "load_error": h.info.capacity.get("load_error"),
        "pid": h.info.pid,
        "host": h.info.host,
        "waiting": r.num_waiting if r else None,
        "waiting_prompt_tokens": r.num_waiting_prompt_tokens if r else None,
        "running": r.num_running if r else None,
        "inflight": r.num_inflight if r else None,
        "kv_utilization": round(r.kv_utilization, 4) if r else None,
        "ttft_ms": round(r.recent_ttft_ms, 2) if r else None,
        "tpot_ms": round(r.recent_tpot_ms, 2) if r else None,
        # Service tiers: the online requests' own means, and the offline (flex) share of the
        # counts above (the rebalancer decides on online load alone).
        "online_ttft_ms": round(r.recent_online_ttft_ms, 2) if r else None,
        "online_tpot_ms": round(r.recent_online_tpot_ms, 2) if r else None,
        "offline_waiting": r.num_offline_waiting if r else None,
        "offline_running": r.num_offline_running if r else None,
        "offline_waiting_prompt_tokens": r.num_offline_waiting_prompt_tokens if r else None,
        # The engine's fitted step cost (wall ms: fixed + per token), what the offline share
        # and pace count in; it moves with the machine's load.
        "step_fixed_ms": round(r.step_fixed_ms, 2) if r else None,
        "step_token_ms": round(r.step_token_ms, 3) if r else None,
        # Encoder backlog: images waiting for / in the vision tower (0 on other roles).
        "images_waiting": r.images_waiting if r else None,
        "images_encoding": r.images_encoding if r else None,
        "encode_ms": round(r.recent_encode_ms, 2) if r else None,
        # Speculative decoding since the worker started (None: it does not speculate).
        "speculation": speculation(r) if r and r.spec_num_drafts else None,
        "can_take": allowed_roles(h),
        # The requests it holds (ids as the gateway named them; "-n<i>" suffixes for n > 1).
        "requests": list(held.request_ids) if held is not None else None,
        "reserved": list(held.reserved_ids) if held is not None else None,
    }


def speculation(r: pb.LoadReport) -> dict[str, Any]:
    """A worker's speculation counters, with its acceptance rate and the tokens one
    verification appends on average (the accepted drafts and the target's own)."""
    return {
        "drafts": r.spec_num_drafts,
        "draft_tokens": r.spec_draft_tokens,
        "accepted_tokens": r.spec_accepted_tokens,
        "acceptance_rate": round(r.spec_accepted_tokens / max(1, r.spec_draft_tokens), 4),
        "mean_accepted_length": round(1 + r.spec_accepted_tokens / r.spec_num_drafts, 3),
    }


async def _status(gw: Gateway, request: Request) -> dict[str, Any]:
    try:
        desired = await gw.rebalancer.store.all()
    except RoleStoreError:
        desired = {}  # status still answers while etcd is away
    handles = sorted(gw.pool.handles.values(), key=lambda h: h.id)
    held = await asyncio.gather(*(_list_requests(h) for h in handles))
    # A worker that left while it was asked is shown under "gone", not as a worker.
    workers = [worker_status(h, desired.get(h.id), x) for h, x in zip(handles, held, strict=True)
               if gw.pool.handles.get(h.id) is h]  # fmt: skip
    return {
        "cluster": gw.cfg.cluster,
        "router": {"id": gw.identity, "pid": os.getpid(), "host": socket.gethostname()},
        "workers": workers,
        "gone": gw.pool.gone.rows(),  # workers that left, with how long ago (routing/gone.py)
        "starting": gw.pool.starting.rows(),  # not serving yet, for how long (routing/starting.py)
        "tiers": {
            "online": {
                "queued_prompt_tokens": gw.admission.queued_tokens,
                "max_queued_tokens": gw.admission.max_queued_tokens,  # per model
                "queued_prompt_tokens_by_model": dict(gw.admission.by_model),
            },
            "offline": gw.offline.status(),
        },  # fmt: skip
        "rebalancer": gw.rebalancer.describe(),
        "kvstore": await gw.kv_index.status(),
    }


async def _health(gw: Gateway, request: Request) -> Response:
    """``/health`` with each worker named: its role, address, reachability and the requests
    this router runs there; 200 or 503 as ``/health``."""
    workers = {
        h.id: {
            "role": h.info.role,
            "address": h.info.address,
            "reachable": h.reachable(),
            "inflight": h.inflight,  # requests this router is running there now
        }
        for h in gw.pool.handles.values()
    }
    ok = gw.healthy()
    body = {"status": "ok" if ok else "unavailable", "workers": workers}
    return JSONResponse(body, status_code=200 if ok else 503)


async def _set_role(gw: Gateway, request: Request) -> dict[str, Any]:
    worker_id = request.path_params["worker_id"]
    body = await _body(request)
    role = body.get("role")
    if role not in ROLES:
        raise AdminError(400, f"role must be one of {', '.join(ROLES)}, got {role!r}", "bad_role")
    h = _worker(gw, worker_id)
    if role != "mixed" and h.info.capacity.get("kv_transfer") == "none":
        raise AdminError(
            400, f"worker {worker_id} runs without KV transfer: it can only be mixed", "bad_role"
        )
    if role == "encode" and not h.info.capacity.get("encode"):
        raise AdminError(
            400, f"worker {worker_id} cannot encode (a text model, or no Mooncake)", "bad_role"
        )
    roles = gw.rebalancer.serving_roles(await gw.rebalancer.store.all(), h.info.model)
    empty = leaves_role_empty(roles, {worker_id: role}) if worker_id in roles else None
    if empty is not None:
        raise AdminError(
            409,
            f"moving {worker_id} to {role} would leave no {empty} worker of {h.info.model}",
            "role_empty",
        )
    await gw.rebalancer.store.set(worker_id, role)
    log.info("admin: desired role of %s set to %s", worker_id, role)
    return {"id": worker_id, "role": role, "previous_role": h.info.role, "epoch": h.info.role_epoch}


async def _drain(gw: Gateway, request: Request) -> dict[str, Any]:
    worker_id = request.path_params["worker_id"]
    body = await _body(request)
    drain = body.get("drain", True)
    if not isinstance(drain, bool):
        raise AdminError(400, "drain must be true or false", "bad_request")
    h = _worker(gw, worker_id)
    roles = gw.rebalancer.serving_roles(await gw.rebalancer.store.all(), h.info.model)
    if drain and worker_id in roles:
        empty = leaves_role_empty(roles, {worker_id: None})
        if empty is not None:
            raise AdminError(
                409,
                f"draining {worker_id} would leave no {empty} worker of {h.info.model}",
                "role_empty",
            )
    try:
        resp = await h.stub.Drain(pb.DrainRequest(drain=drain), timeout=UNARY_TIMEOUT_S)
    except Exception as exc:
        # NOTE: an AioRpcError's str() is its whole multi-line repr (debug_error_string and
        # all), which `epdserve drain` printed as is: its code and details say it.
        why = f"{exc.code().name} {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else exc
        raise AdminError(
            503, f"worker {worker_id} did not answer: {why}", "worker_unavailable"
        ) from None
    log.info("admin: worker %s draining=%s", worker_id, resp.draining)
    return {"id": worker_id, "draining": resp.draining, "inflight": resp.num_inflight}


async def _experts(gw: Gateway, request: Request) -> dict[str, Any]:
    """Re-place a worker's MoE experts (EPLB) between two of its steps: from the load it
    recorded (``num_slots`` physical experts per layer, default as now) or as ``placement``."""
    worker_id = request.path_params["worker_id"]
    body = await _body(request)
    slots, placement = body.get("num_slots", 0), body.get("placement")
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
        raise AdminError(400, "num_slots must be an integer >= 0", "bad_request")
    if placement is not None and not isinstance(placement, dict):
        raise AdminError(400, 'placement must be {"layers": [...]}', "bad_request")
    h = _worker(gw, worker_id)
    ask = pb.RebalanceExpertsRequest(
        num_slots=slots, placement_json=json.dumps(placement) if placement else ""
    )
    try:
        resp = await h.stub.RebalanceExperts(ask, timeout=EXPERTS_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise AdminError(400, exc.details() or "refused", "bad_request") from None
        raise AdminError(
            503, f"worker {worker_id} did not re-place its experts: {exc.details()}",
            "worker_unavailable",
        ) from None  # fmt: skip
    log.info("admin: worker %s re-placed its experts", worker_id)
    return {
        "id": worker_id,
        "imbalance_before": list(resp.imbalance_before),
        "imbalance_after": list(resp.imbalance_after),
        "placement": json.loads(resp.placement_json),
        "saved_to": resp.saved_to or None,
    }


async def _rebalance(gw: Gateway, request: Request) -> dict[str, Any]:
    body = await _body(request)
    dry_run = bool(body.get("dry_run", False))
    decision = await gw.rebalancer.round(manual=True, dry_run=dry_run)
    return {"decision": decision.to_dict()}


async def _policy(gw: Gateway, request: Request) -> dict[str, Any]:
    body = await _body(request)
    name = body.get("name")
    params = body.get("params") or {}
    if not isinstance(name, str) or not isinstance(params, dict):
        raise AdminError(400, 'body must be {"name": str, "params": {k: v}}', "bad_request")
    try:
        await gw.rebalancer.publish_policy(name, params)
    except ValueError as exc:
        raise AdminError(400, str(exc), "bad_policy") from None
    except RoleStoreError as exc:
        raise AdminError(503, f"policy not changed: {exc}", "etcd_unavailable") from None
    return {"policy": name, "params": gw.rebalancer.policy.params()}


def admin_routes() -> list[Route]:
    return [
        Route("/admin/status", _guard(_status), methods=["GET"]),
        Route("/admin/health", _guard(_health), methods=["GET"]),
        Route("/admin/workers/{worker_id}/role", _guard(_set_role), methods=["POST"]),
        Route("/admin/workers/{worker_id}/drain", _guard(_drain), methods=["POST"]),
        Route("/admin/workers/{worker_id}/experts", _guard(_experts), methods=["POST"]),
        Route("/admin/rebalance", _guard(_rebalance), methods=["POST"]),
        Route("/admin/policy", _guard(_policy), methods=["POST"]),
    ]
