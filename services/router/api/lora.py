"""vLLM's LoRA adapter endpoints, admin-protected: ``POST /v1/load_lora_adapter``
(``{"lora_name", "lora_path", "base_model"?}``) loads a PEFT folder on every worker of the
base model over gRPC (``LoadLoRA``), ``POST /v1/unload_lora_adapter`` (``{"lora_name"}``)
unloads it from every worker holding it. A request then names the adapter as its model and
is routed only to workers that hold it (``WorkerHandle.serves``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
from starlette.requests import Request
from starlette.routing import Route

from services.common.proto import worker_pb2 as pb
from services.router.api.admin import AdminError, _body, _guard

if TYPE_CHECKING:
    from services.router.gateway import Gateway

LORA_TIMEOUT_S = 30.0  # reading an adapter's files on every worker


def _name(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise AdminError(400, f"'{key}' must be a non-empty string", "bad_request")
    return value


def _base_model(gw: Gateway, body: dict[str, Any], name: str) -> str:
    models = gw.pool.models()
    if name in models:
        raise AdminError(400, f"'{name}' is a base model's name", "bad_request")
    base = body.get("base_model")
    if base is None:
        if len(models) != 1:
            raise AdminError(400, "'base_model' is needed: the cluster serves "
                             f"{len(models)} models", "bad_request")  # fmt: skip
        return next(iter(models))
    if base not in models:
        raise AdminError(404, f"unknown base model {base!r}", "model_not_found")
    return str(base)


async def _on_workers(handles, call) -> None:
    """Run ``call(handle)`` (a LoRA RPC) on every handle at once, record each answer's
    adapters on its handle; the first refusal becomes the endpoint's error."""
    results = await asyncio.gather(*(call(h) for h in handles), return_exceptions=True)
    failures = []
    for h, result in zip(handles, results, strict=True):
        if isinstance(result, pb.LoRAAdaptersResponse):
            h.lora_adapters = frozenset(result.adapters)
        elif isinstance(result, grpc.aio.AioRpcError):
            if result.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise AdminError(400, result.details() or "bad adapter", "bad_request")
            if result.code() != grpc.StatusCode.NOT_FOUND:
                failures.append(f"{h.id}: {result.code().name} {result.details()}")
        elif isinstance(result, BaseException):
            failures.append(f"{h.id}: {result!r}")
    if failures:
        raise AdminError(503, "workers failed: " + "; ".join(failures), "worker_failed")


async def _load(gw: Gateway, request: Request) -> dict[str, Any]:
    body = await _body(request)
    name, path = _name(body, "lora_name"), _name(body, "lora_path")
    base = _base_model(gw, body, name)
    handles = [h for h in gw.pool.handles.values() if h.info.model == base]
    if not handles:
        raise AdminError(503, f"no worker serves {base!r}", "no_workers")
    ask = pb.LoadLoRARequest(name=name, path=path)
    await _on_workers(handles, lambda h: h.stub.LoadLoRA(ask, timeout=LORA_TIMEOUT_S))
    return {"lora_name": name, "base_model": base, "workers": sorted(h.id for h in handles)}


async def _unload(gw: Gateway, request: Request) -> dict[str, Any]:
    name = _name(await _body(request), "lora_name")
    handles = [h for h in gw.pool.handles.values() if name in h.lora_adapters]
    if not handles:
        raise AdminError(404, f"no worker holds LoRA adapter {name!r}", "lora_not_found")
    ask = pb.UnloadLoRARequest(name=name)
    await _on_workers(handles, lambda h: h.stub.UnloadLoRA(ask, timeout=LORA_TIMEOUT_S))
    return {"lora_name": name, "workers": sorted(h.id for h in handles)}


def lora_routes() -> list[Route]:
    return [
        Route("/v1/load_lora_adapter", _guard(_load), methods=["POST"]),
        Route("/v1/unload_lora_adapter", _guard(_unload), methods=["POST"]),
    ]
