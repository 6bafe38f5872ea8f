"""vLLM's LoRA adapter endpoints, admin-protected: ``POST /v1/load_lora_adapter``
(``{"lora_name", "lora_path", "base_model"?}``) loads a PEFT folder on every worker of the
base model over gRPC (``LoadLoRA``), ``POST /v1/unload_lora_adapter`` (``{"lora_name"}``)
unloads it from every worker holding it. A request then names the adapter as its model and
is routed only to workers that hold it (``WorkerHandle.serves``).

A load is all or nothing: when a worker refuses or fails, the workers that took the adapter
give it up again (or get back the folder they held under that name), and the error says
which failed. A load that succeeded is recorded in etcd (``common/lora_registry.py``) and
workers started later load it too; an unload deletes the record first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc
from starlette.requests import Request
from starlette.routing import Route

from services.common.lora_registry import AdapterRecord
from services.common.proto import worker_pb2 as pb
from services.engine.model_files import name_problem
from services.router.api.admin import AdminError, _body, _guard

if TYPE_CHECKING:
    from services.router.gateway import Gateway
    from services.router.routing.workers import WorkerHandle

log = logging.getLogger(__name__)

LORA_TIMEOUT_S = 30.0  # reading an adapter's files on every worker


def _name(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise AdminError(400, f"'{key}' must be a non-empty string", "bad_request")
    problem = name_problem(value) if key == "lora_name" else None
    if problem is not None:
        raise AdminError(400, f"'lora_name': {problem}", "bad_request")
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


async def _on_workers(handles: list[WorkerHandle], call) -> list[Any]:
    """Run ``call(handle)`` (a LoRA RPC) on every handle at once and record each answer's
    adapters on its handle; the answers (or exceptions), in order."""
    results = await asyncio.gather(*(call(h) for h in handles), return_exceptions=True)
    for h, result in zip(handles, results, strict=True):
        if isinstance(result, pb.LoRAAdaptersResponse):
            h.lora_adapters = frozenset(result.adapters)
    return results


def _failure(handles: list[WorkerHandle], results: list[Any]) -> AdminError | None:
    """The endpoint's error for the workers' answers (a refused adapter is a 400, a worker
    that failed a 503), or None when every worker did it (or, unloading, held none)."""
    refused, failed = [], []
    for h, result in zip(handles, results, strict=True):
        if isinstance(result, grpc.aio.AioRpcError):
            if result.code() == grpc.StatusCode.INVALID_ARGUMENT:
                refused.append(result.details() or "bad adapter")
            elif result.code() != grpc.StatusCode.NOT_FOUND:
                failed.append(f"{h.id}: {result.code().name} {result.details()}")
        elif isinstance(result, BaseException):
            failed.append(f"{h.id}: {result!r}")
    if refused:
        return AdminError(400, refused[0], "bad_request")
    if failed:
        return AdminError(503, "workers failed: " + "; ".join(failed), "worker_failed")
    return None


async def _roll_back(
    handles: list[WorkerHandle], results: list[Any], name: str, held: set[str],
    previous: AdapterRecord | None,
) -> None:  # fmt: skip
    """Undo a load on the workers that took it: unload it where it was new, load the
    recorded folder again where it replaced one."""

    def undo(h: WorkerHandle):
        if h.id not in held:
            return h.stub.UnloadLoRA(pb.UnloadLoRARequest(name=name), timeout=LORA_TIMEOUT_S)
        assert previous is not None
        ask = pb.LoadLoRARequest(name=name, path=previous.path)
        return h.stub.LoadLoRA(ask, timeout=LORA_TIMEOUT_S)

    took = [h for h, r in zip(handles, results, strict=True)
            if isinstance(r, pb.LoRAAdaptersResponse) and (h.id not in held or previous)]  # fmt: skip
    undone = await _on_workers(took, undo)
    for h, result in zip(took, undone, strict=True):
        if isinstance(result, BaseException):
            log.error("rolling back LoRA adapter %s on %s failed: %r", name, h.id, result)


def _check_one_base(gw: Gateway, name: str, base: str, previous: AdapterRecord | None) -> None:
    """A 400 when ``name`` is an adapter of another base model (recorded, or held by one of
    its workers). NOTE: a name names one adapter: held by two base models' workers, a request
    for it went to either, tokenized for one model and run on the other."""
    others = {h.info.model for h in gw.pool.handles.values() if name in h.lora_adapters}
    if previous is not None:
        others.add(previous.base_model)
    others.discard(base)
    if others:
        raise AdminError(400, f"LoRA adapter {name!r} is loaded for the base model "
                         f"{sorted(others)[0]!r}: unload it first, or load this one under "
                         "another name", "bad_request")  # fmt: skip


async def _load(gw: Gateway, request: Request) -> dict[str, Any]:
    body = await _body(request)
    name, path = _name(body, "lora_name"), _name(body, "lora_path")
    base = _base_model(gw, body, name)
    handles = [h for h in gw.pool.handles.values() if h.info.model == base]
    if not handles:
        raise AdminError(503, f"no worker serves {base!r}", "no_workers")
    try:
        previous = await gw.lora_registry.get(name)
    except Exception as exc:  # noqa: BLE001 - etcd away: nothing done yet
        raise AdminError(503, f"the adapter registry (etcd) is unavailable: {exc}",
                         "etcd_unavailable") from None  # fmt: skip
    _check_one_base(gw, name, base, previous)
    held = {h.id for h in handles if name in h.lora_adapters}
    ask = pb.LoadLoRARequest(name=name, path=path)

    def load(h: WorkerHandle):
        return h.stub.LoadLoRA(ask, timeout=LORA_TIMEOUT_S)

    results = await _on_workers(handles, load)
    error = _failure(handles, results)
    if error is None:
        try:
            await gw.lora_registry.put(name, AdapterRecord(path, base))
        except Exception as exc:  # noqa: BLE001 - not recorded: not loaded
            error = AdminError(503, f"recording the adapter in etcd failed: {exc}",
                               "etcd_unavailable")  # fmt: skip
    if error is not None:
        await _roll_back(handles, results, name, held, previous)
        raise error
    # Workers that joined while it loaded (they may have listed the registry before the put).
    asked = {h.id for h in handles}
    late = [h for h in gw.pool.handles.values() if h.info.model == base and h.id not in asked]
    for h, result in zip(late, await _on_workers(late, load), strict=True):
        if isinstance(result, BaseException):
            log.warning("LoRA adapter %s on the late worker %s: %r", name, h.id, result)
    return {"lora_name": name, "base_model": base,
            "workers": sorted(asked | {h.id for h in late})}  # fmt: skip


async def _unload(gw: Gateway, request: Request) -> dict[str, Any]:
    name = _name(await _body(request), "lora_name")
    try:
        recorded = await gw.lora_registry.delete(name)  # first: no new worker loads it
    except Exception as exc:  # noqa: BLE001 - etcd away: nothing done yet
        raise AdminError(503, f"the adapter registry (etcd) is unavailable: {exc}",
                         "etcd_unavailable") from None  # fmt: skip
    # NOTE: a worker that loaded the record at start may not have reported it yet.
    base = recorded.base_model if recorded is not None else None
    handles = [h for h in gw.pool.handles.values()
               if name in h.lora_adapters or h.info.model == base]  # fmt: skip
    if not handles and recorded is None:
        raise AdminError(404, f"no worker holds LoRA adapter {name!r}", "lora_not_found")
    holding = {h.id for h in handles if name in h.lora_adapters}
    ask = pb.UnloadLoRARequest(name=name)
    results = await _on_workers(handles, lambda h: h.stub.UnloadLoRA(ask, timeout=LORA_TIMEOUT_S))
    # Only the reported holders' failures count: another worker of the base model may not
    # hold it (NOT_FOUND) or serve no adapters at all (LoRA off: INVALID_ARGUMENT).
    reported = [(h, r) for h, r in zip(handles, results, strict=True) if h.id in holding]
    if (error := _failure([h for h, _ in reported], [r for _, r in reported])) is not None:
        raise error
    held = [h.id for h, r in zip(handles, results, strict=True) if not isinstance(r, Exception)]
    if not held and recorded is None:
        raise AdminError(404, f"no worker holds LoRA adapter {name!r}", "lora_not_found")
    return {"lora_name": name, "workers": sorted(held)}


def _one_at_a_time(fn):
    """``fn`` under the router's LoRA admin lock. NOTE: a load's roll back (and an unload)
    acts on what it saw when it started: two at once undid each other's work, and workers
    were left without an adapter etcd records as loaded. Routers do not share the lock:
    send a cluster's LoRA admin calls to one router."""

    async def locked(gw: Gateway, request: Request) -> dict[str, Any]:
        async with gw.lora_admin:
            return await fn(gw, request)

    return locked


def lora_routes() -> list[Route]:
    return [
        Route("/v1/load_lora_adapter", _guard(_one_at_a_time(_load)), methods=["POST"]),
        Route("/v1/unload_lora_adapter", _guard(_one_at_a_time(_unload)), methods=["POST"]),
    ]
