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
# After etcd was away (its lease may have run out meanwhile), a live restarting worker puts
# its key back within this of etcd answering again (lease_handover.LeaseKeeper retries each
# ETCD_OP_TIMEOUT_S + 0.5 s and refreshes every 5 s); the GONE_FOR_S count starts after it.
BACK_GRACE_S = 10.0
ETCD_PING_S = 1.0  # how often a load's wait asks whether etcd answers
ETCD_SLOW_S = 2.0  # a ping not answered this fast counts as etcd away (its timeout: 4 s)
LOG_EVERY_S = 15.0  # a load's wait says in the log what it waits on this often


class EtcdOutages:
    """Whether etcd answered this router while a model load waited, from a ping every
    ETCD_PING_S. A worker's key runs out by itself when etcd is away longer than its lease
    (the restarting process cannot keep it alive), so a key gone then says nothing about the
    process: the wait goes on for it to register again."""

    def __init__(self, endpoints: list[str]) -> None:
        self.session = EtcdSession(endpoints)
        self.unreachable_s = 0.0  # seconds etcd did not answer since the load began
        self.down = False  # the last ping failed
        self.back_at = 0.0  # monotonic time of the first good ping after the latest outage
        self._asking: float | None = None  # when the ping in flight began
        self._task: asyncio.Task[None] | None = None

    @property
    def seen(self) -> bool:
        """etcd did not answer at some point: a ping failed, or one took over ETCD_SLOW_S."""
        slow = self._asking is not None and time.monotonic() - self._asking > ETCD_SLOW_S
        return self.down or self.unreachable_s > 0 or slow

    @property
    def away(self) -> bool:
        """etcd does not answer now: the last ping failed, or the one in flight is slow."""
        slow = self._asking is not None and time.monotonic() - self._asking > ETCD_SLOW_S
        return self.down or slow

    def start(self) -> EtcdOutages:
        self._task = asyncio.create_task(self._run(), name="load-etcd-ping")
        return self

    async def _run(self) -> None:
        while True:
            began = self._asking = time.monotonic()
            try:
                await self.session.call(lambda c: c.kv.get(b"/epdserve-ping"))  # type: ignore[union-attr]
                if (took := time.monotonic() - began) > ETCD_SLOW_S:  # answered late: away
                    self.unreachable_s += took
                    self.back_at = time.monotonic()
                elif self.down:
                    self.back_at = time.monotonic()
                self.down = False
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


class RestartWait:
    """What a model load waits on: the worker's handle once a new incarnation of it serves
    (a load report arrived). Its key left etcd for good (the restarting process keeps it,
    "loading" or "starting", until it serves: worker/lease_handover.py): the process died.
    After etcd was away (``etcd``), a key gone says that only from BACK_GRACE_S after etcd
    answers again: the lease may have run out by itself, and a live process puts it back."""

    def __init__(self, gw: Gateway, worker_id: str, incarnation: str,
                 etcd: EtcdOutages | None = None) -> None:  # fmt: skip
        self.gw = gw
        self.worker_id = worker_id
        self.incarnation = incarnation  # the old process's
        self.etcd = etcd
        self.seen = time.monotonic()  # when its key (a handle, or "starting") was last seen

    def served(self, now: float) -> WorkerHandle | None:
        """Its new incarnation serving; None: not yet. AdminError: the process died."""
        h = self.gw.pool.handles.get(self.worker_id)
        if h is not None or self.gw.pool.starting.is_starting(self.worker_id):
            self.seen = now
        elif now - self._gone_since() > GONE_FOR_S and not (self.etcd and self.etcd.away):
            raise AdminError(503, f"worker {self.worker_id} left the cluster while restarting "
                             "with the new model (its registration ran out: the process died)"
                             f"{self._etcd_said()}; see its log", "worker_lost")  # fmt: skip
        if h is not None and h.info.incarnation != self.incarnation:
            if h.state == "serving" and h.reachable():
                return h
        return None

    def _gone_since(self) -> float:
        if self.etcd is None or not self.etcd.seen:
            return self.seen
        return max(self.seen, self.etcd.back_at + BACK_GRACE_S)

    def _etcd_said(self) -> str:
        if self.etcd is None or not self.etcd.seen:
            return ""
        return (f"; etcd did not answer for {self.etcd.unreachable_s:.0f} s meanwhile, and "
                "the key did not come back once it did")  # fmt: skip

    def waits_on(self, now: float) -> str:
        """What it waits for, in words (the log's, and a timeout's answer)."""
        h = self.gw.pool.handles.get(self.worker_id)
        if h is not None and h.info.incarnation == self.incarnation:
            what = (f"its key still names the old process ({self.incarnation}, state "
                    f"{h.state}): it restarts and loads")  # fmt: skip
        elif h is not None:
            seen = "reachable" if h.reachable() else "no load report yet"
            what = f"its new process ({h.info.incarnation}) is listed, state {h.state}, {seen}"
        elif self.gw.pool.starting.is_starting(self.worker_id):
            what = "its new process says it is starting"
        else:
            what = f"its key is gone for {now - self.seen:.0f} s"
        if self.etcd is not None and self.etcd.seen:
            what += f"; etcd did not answer for {self.etcd.unreachable_s:.0f} s meanwhile"
        return what


async def _restarted(gw: Gateway, worker_id: str, incarnation: str,
                     etcd: EtcdOutages | None = None) -> WorkerHandle | str:  # fmt: skip
    """The worker's handle once a new incarnation of it serves, or what it still waited on
    after LOAD_WAIT_S (logged every LOG_EVERY_S meanwhile). AdminError: the process died
    (RestartWait)."""
    wait = RestartWait(gw, worker_id, incarnation, etcd)
    started = said = time.monotonic()
    while (now := time.monotonic()) < started + LOAD_WAIT_S:
        if (h := wait.served(now)) is not None:
            return h
        if now - said >= LOG_EVERY_S:
            said = now
            log.info("admin: model load of worker %s: waiting %.0f s of %.0f for it to serve "
                     "again: %s", worker_id, now - started, LOAD_WAIT_S, wait.waits_on(now))  # fmt: skip
        await asyncio.sleep(0.2)
    return wait.waits_on(time.monotonic())


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
    if isinstance(new, str):
        raise AdminError(504, f"worker {worker_id} did not serve again within {LOAD_WAIT_S:.0f} "
                         f"s of draining ({new}); see its log", "load_timeout")  # fmt: skip
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
