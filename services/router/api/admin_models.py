"""The admin API's model calls: sleep or wake a worker's model, load another model onto it
(``epdserve models sleep|wake|load``). Errors as the rest of the admin API (api/admin.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc
from starlette.requests import Request
from starlette.routing import Route

from services.common.etcd_client import EtcdSession
from services.common.proto import worker_pb2 as pb
from services.router.api.admin import AdminError, _body, _guard, _worker

if TYPE_CHECKING:
    from services.router.gateway import Gateway
    from services.router.routing.workers import WorkerHandle

log = logging.getLogger(__name__)

# A sleep or a model load drains the worker first (its role drain timeout); a sleep then
# writes its weights out.
SLEEP_RPC_TIMEOUT_S = 600.0
# After the drain, a loading worker restarts with the new model (imports, weights, KV cache)
# and registers again: wait this long for it to serve.
LOAD_WAIT_S = 600.0
# A restarting worker's key stays in etcd until it serves (worker/lease_handover.py): gone
# this long, the process died. (Not at once: a lease that ran out under load is put again.)
GONE_FOR_S = 5.0
ETCD_PING_S = 1.0  # how often a load's wait asks whether etcd answers
ETCD_SLOW_S = 2.0  # a ping not answered this fast counts as etcd away (its timeout: 4 s)


class EtcdOutages:
    """Whether etcd answered this router while a model load waited, from a ping every
    ETCD_PING_S. A worker's key runs out by itself when etcd is away longer than its lease
    (the restarting process cannot keep it alive), so a key gone then says nothing about the
    process: the wait goes on for it to register again."""

    def __init__(self, endpoints: list[str]) -> None:
        self.session = EtcdSession(endpoints)
        self.unreachable_s = 0.0  # seconds etcd did not answer since the load began
        self.down = False  # the last ping failed
        self._asking: float | None = None  # when the ping in flight began
        self._task: asyncio.Task[None] | None = None

    @property
    def seen(self) -> bool:
        """etcd did not answer at some point: a ping failed, or one took over ETCD_SLOW_S."""
        slow = self._asking is not None and time.monotonic() - self._asking > ETCD_SLOW_S
        return self.down or self.unreachable_s > 0 or slow

    def start(self) -> EtcdOutages:
        self._task = asyncio.create_task(self._run(), name="load-etcd-ping")
        return self

    async def _run(self) -> None:
        while True:
            began = self._asking = time.monotonic()
            try:
                await self.session.call(lambda c: c.kv.get(b"/epdserve-ping"))  # type: ignore[union-attr]
                self.down = False
                if (took := time.monotonic() - began) > ETCD_SLOW_S:  # answered late: away
                    self.unreachable_s += took
            except Exception:  # noqa: BLE001 - unreachable, timed out, refused
                self.down = True
                self.unreachable_s += max(time.monotonic() - began, ETCD_PING_S)
            finally:
                self._asking = None
            await asyncio.sleep(max(0.0, ETCD_PING_S - (time.monotonic() - began)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.session.close()


def _rpc_error(worker_id: str, exc: grpc.aio.AioRpcError) -> AdminError:
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return AdminError(400, f"worker {worker_id}: {exc.details()}", "bad_request")
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
        return AdminError(409, f"worker {worker_id}: {exc.details()}", "conflict")
    return AdminError(503, f"worker {worker_id}: {exc.details()}", "worker_unavailable")


async def _sleep(gw: Gateway, request: Request) -> dict[str, Any]:
    """Put a worker to sleep (drain, then free its weights and KV memory) or wake it up."""
    worker_id = request.path_params["worker_id"]
    sleep = (await _body(request)).get("sleep", True)
    if not isinstance(sleep, bool):
        raise AdminError(400, "sleep must be true or false", "bad_request")
    h = _worker(gw, worker_id)
    try:
        resp = await h.stub.Sleep(pb.SleepRequest(sleep=sleep), timeout=SLEEP_RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        raise _rpc_error(worker_id, exc) from None
    log.info("admin: worker %s (model %s) %s", worker_id, h.info.model,
             "asleep" if resp.sleeping else "awake")  # fmt: skip
    return {"id": worker_id, "model": h.info.model, "sleeping": resp.sleeping,
            "weight_bytes": resp.weight_bytes, "kv_bytes": resp.kv_bytes,
            "seconds": resp.seconds}  # fmt: skip


async def _restarted(
    gw: Gateway, worker_id: str, incarnation: str, etcd: EtcdOutages | None = None
) -> WorkerHandle | None:
    """The worker's handle once a new incarnation of it serves (a load report arrived), or
    None after LOAD_WAIT_S. AdminError: its key left etcd (the restarting process keeps it,
    "loading", until it serves: worker/lease_handover.py), so the process died; unless etcd
    was away meanwhile (``etcd``), which ends the key by itself: then it waits on."""
    deadline = seen = time.monotonic()
    deadline += LOAD_WAIT_S
    while (now := time.monotonic()) < deadline:
        h = gw.pool.handles.get(worker_id)
        if h is None and now - seen > GONE_FOR_S and not (etcd is not None and etcd.seen):
            raise AdminError(503, f"worker {worker_id} left the cluster while restarting with "
                             "the new model (its registration ran out: the process died); see "
                             "its log", "worker_lost")  # fmt: skip
        if h is not None:
            seen = now
            if h.info.incarnation != incarnation and h.state == "serving" and h.reachable():
                return h
        await asyncio.sleep(0.2)
    return None


async def _load_model(gw: Gateway, request: Request) -> dict[str, Any]:
    """Load another model onto a worker: it drains, restarts with the model and joins that
    model's pool; a model that fails to start leaves it serving the old one (an error)."""
    worker_id = request.path_params["worker_id"]
    body = await _body(request)
    model, name = body.get("model"), body.get("served_model_name") or ""
    if not isinstance(model, str) or not model or not isinstance(name, str):
        raise AdminError(400, 'body must be {"model": PATH, "served_model_name"?: str}',
                         "bad_request")  # fmt: skip
    h = _worker(gw, worker_id)
    previous, incarnation = h.info.model, h.info.incarnation
    started = time.monotonic()
    req = pb.LoadModelRequest(model=model, served_model_name=name)
    try:
        resp = await h.stub.LoadModel(req, timeout=SLEEP_RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        raise _rpc_error(worker_id, exc) from None
    log.info("admin: worker %s drained (%.1fs); restarting with model %s (was %s)",
             worker_id, resp.drain_seconds, resp.model, previous)  # fmt: skip
    etcd = EtcdOutages(gw.cfg.etcd_endpoints).start()
    try:
        new = await _restarted(gw, worker_id, incarnation, etcd)
    finally:
        await etcd.stop()
    away = (f"; etcd did not answer for {etcd.unreachable_s:.0f} s meanwhile, so its "
            "registration may have run out while it loaded") if etcd.seen else ""  # fmt: skip
    if new is None:
        raise AdminError(504, f"worker {worker_id} did not serve again within {LOAD_WAIT_S:.0f} "
                         f"s of draining{away}; see its log", "load_timeout")  # fmt: skip
    if etcd.seen:
        log.info("admin: worker %s served again after etcd was away %.0f s", worker_id,
                 etcd.unreachable_s)  # fmt: skip
    error = new.info.capacity.get("load_error")
    if error or new.info.model != resp.model:
        raise AdminError(422, f"worker {worker_id} could not start model {model}: {error}; "
                         f"it serves {new.info.model} again", "model_load_failed")  # fmt: skip
    return {"id": worker_id, "model": new.info.model, "previous_model": previous,
            "drain_seconds": resp.drain_seconds, "seconds": time.monotonic() - started,
            "etcd_unreachable_seconds": round(etcd.unreachable_s, 1)}  # fmt: skip


def model_routes() -> list[Route]:
    return [
        Route("/admin/workers/{worker_id}/sleep", _guard(_sleep), methods=["POST"]),
        Route("/admin/workers/{worker_id}/model", _guard(_load_model), methods=["POST"]),
    ]
