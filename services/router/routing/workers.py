"""The router's view of the workers: etcd membership plus one load stream per worker."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from services.common.aio import cancel_and_wait
from services.common.grpc_utils import GrpcTLS, channel
from services.common.membership import InstanceInfo
from services.common.proto import health_pb2_grpc
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.router.phases import TracedStub
from services.router.routing.gone import GoneWorkers
from services.router.routing.load_stream import follow_load
from services.router.routing.mux import MuxStub
from services.router.routing.restarts import LostWorkers
from services.router.routing.starting import STARTING, StartingWorkers

log = logging.getLogger(__name__)

# A worker whose etcd key vanished while its load stream lives (etcd was down or stalled for
# longer than the lease) keeps serving this long, waiting for it to register again.
DEPARTED_GRACE_S = 30.0
# A request's first message may take this many times its expected queueing + prefill time
# (first_message_s) before its worker counts as hung.
FIRST_MESSAGE_SAFETY = 4.0


class RateWindow:
    """The best rate among the last ``maxlen`` samples: a Prefill call's tokens per second
    includes its queueing, so the fastest recent one is the closest to the worker's speed."""

    def __init__(self, maxlen: int = 64) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=maxlen)

    def add(self, rate: float) -> None:
        self._samples.append(rate)

    def best(self) -> float:
        """0 when nothing was measured yet."""
        return max(self._samples, default=0.0)


class WorkerHandle:
    """One worker as the router sees it: advertisement, channel, latest load, local count."""

    def __init__(
        self, info: InstanceInfo, load_interval_ms: int, stale_s: float,
        tls: GrpcTLS | None = None, mux: bool = False,
    ) -> None:  # fmt: skip
        self.info = info
        self.channel = channel(info.address, tls)
        plain = pb_grpc.WorkerServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        # ``mux``: its Generate calls share one stream (mux.py). Times the calls of requests
        # and carries their trace context (phases.py).
        self.stub: Any = TracedStub(MuxStub(plain) if mux else plain, self)
        self.load: pb.LoadReport | None = None
        # LoRA adapters it holds: from its load reports, and from load / unload answers.
        self.lora_adapters: frozenset[str] = frozenset()
        # Of those, the ones in its engine slots, and its slot count (lora_affinity.py).
        self.lora_resident: frozenset[str] = frozenset()
        self.lora_slots = 0
        self.lora_routed: dict[str, float] = {}  # adapter -> when a request for it went here
        self.load_at = 0.0  # monotonic time of the latest report
        # ... and of the latest health Check answered SERVING while reports were late (a
        # worker slowed down by a loaded host, not a hung one: load_stream.answers).
        self.answered_at = 0.0
        self.message_at = 0.0  # ... and of the latest stream message of any call (watch.py)
        self.progress_at = 0.0  # ... and of its engine's progress, as its load reports say
        self.inflight = 0  # requests this router has running there
        # Requests of this router that ended there since the latest report, and their prompt
        # tokens: a report taken before they ended still counts them (policies/base.py).
        self.ended_since_report = 0
        self.prompt_tokens_ended_since_report = 0
        self.failed_at = 0.0  # last time a call to it failed with UNAVAILABLE
        self.stale_epoch = 0  # it refused this epoch of ours: wait for a newer advertisement
        self.departed_at = 0.0  # monotonic time its etcd key vanished while it lived; 0: listed
        # Called (by the load stream) when a departed worker is gone for good: drop it.
        self.on_gone: Callable[[WorkerHandle], None] | None = None
        # prompt tokens/s of its Prefill calls (and Generate calls to their first message) from here
        self.prefill_rate = RateWindow()
        self.interval_ms = load_interval_ms
        self.stale_s = stale_s
        self._task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def process(self) -> str:
        """This process of the worker: a restart keeps the id and draws a new incarnation."""
        return f"{self.info.id}@{self.info.incarnation}"

    def serves(self, model: str | None) -> bool:
        """It serves ``model``: its base model, or a LoRA adapter it holds (None: any)."""
        return model is None or self.info.model == model or model in self.lora_adapters

    @property
    def max_model_len(self) -> int:
        return int(self.info.capacity.get("max_model_len", 0) or 0)

    def reachable(self, now: float | None = None) -> bool:
        """A load report arrived recently (or, reports late, a health Check was answered)
        and no call failed since."""
        now = time.monotonic() if now is None else now
        return self.alive_at > self.failed_at and now - self.alive_at < self.stale_s

    @property
    def alive_at(self) -> float:
        """Monotonic time of its latest sign of life: a load report or an answered Check."""
        return max(self.load_at, self.answered_at)

    def load_fresh(self, now: float) -> bool:
        """Its latest load report is recent: routing by it is routing by its real load."""
        return now - self.load_at < self.stale_s

    def silence(self, now: float) -> float:
        """Seconds since its latest sign of life (a load report, or an answered Check)."""
        return now - self.alive_at

    def silent(self, now: float) -> bool:
        """Its load stream went quiet and it does not answer a health Check: the process is
        stopped or hung (or its engine stalled), or its host is cut off (a process that
        died closes its connections and fails the calls at once)."""
        return self.alive_at > 0 and self.silence(now) > self.stale_s

    def first_message_s(self, prompt_tokens: int, stall_s: float) -> float:
        """How long a new request may wait here for its first message: its own prefill
        behind the prompt tokens this worker reports queued, at the best prefill rate seen
        from it, times ``FIRST_MESSAGE_SAFETY``; never less than ``stall_s``. Without a
        measured rate, a worker reporting work queued or running gets ``stall_s`` times the
        safety factor. NOTE: a hung worker is still caught sooner by its load stream going
        silent; this only bounds an engine that stays alive but never gets to the request."""
        load = self.load
        if load is None:
            return stall_s
        rate = self.prefill_rate.best()
        if rate <= 0:
            busy = load.num_waiting + load.num_running > 0
            return stall_s * FIRST_MESSAGE_SAFETY if busy else stall_s
        expected = (load.num_waiting_prompt_tokens + prompt_tokens) / rate
        return max(stall_s, expected * FIRST_MESSAGE_SAFETY)

    @property
    def state(self) -> str:
        """serving | draining | flipping, as advertised (a load report may know first)."""
        if self.info.state != "serving" or self.info.draining:
            return "draining" if self.info.state == "serving" else self.info.state
        if self.load is not None and self.load.draining:
            return "draining"
        return "serving"

    def usable_for(self, role: str, now: float | None = None) -> bool:
        # NOTE: never route on a view the worker has moved past: mid-flip, a refused epoch,
        # or a load report already showing a newer epoch than the advertisement we hold.
        now = time.monotonic() if now is None else now
        newer = self.load is not None and self.load.role_epoch > self.info.role_epoch
        return (
            self.info.role == role
            and self.state == "serving"
            and self.info.role_epoch > self.stale_epoch
            and not newer
            and self.reachable(now)
            and not self.departed_for_good(now)
        )

    def departed_for_good(self, now: float) -> bool:
        """Its etcd key vanished more than DEPARTED_GRACE_S ago, or it stopped answering
        since: it is not coming back."""
        return bool(self.departed_at) and (
            now - self.departed_at > DEPARTED_GRACE_S or not self.reachable(now)
        )

    def mark_failed(self) -> None:
        self.failed_at = time.monotonic()

    def mark_stale_epoch(self, epoch: int) -> None:
        """The worker refused ``epoch`` as stale: skip it until etcd shows a newer one."""
        self.stale_epoch = max(self.stale_epoch, epoch)

    def start(self) -> None:
        self._task = asyncio.create_task(follow_load(self), name=f"load-{self.id}")

    def end_request(self, prompt_tokens: int) -> None:
        """One of this router's requests there ended (``prompt_tokens``: what it asked the
        worker to compute, 0 where it computes no prompt)."""
        self.inflight -= 1
        self.ended_since_report += 1
        self.prompt_tokens_ended_since_report += prompt_tokens

    async def close(self, wait_inflight_s: float = 0.0) -> None:
        """Stop the load stream; close the channel once our requests there are done (a
        draining worker that left etcd still finishes them), or after ``wait_inflight_s``.
        The close cancels every call on the channel, the shared mux stream's too (mux.py)."""
        await cancel_and_wait(self._task)
        deadline = time.monotonic() + wait_inflight_s
        try:
            while self.inflight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await self.channel.close(grace=None)


class WorkerPool:
    """Follows membership changes; hands out usable workers of a role and model."""

    def __init__(
        self,
        load_interval_ms: int = 200,
        stale_s: float = 5.0,
        drain_wait_s: float = 600.0,
        tls: GrpcTLS | None = None,
        mux: bool = False,
    ) -> None:
        self.handles: dict[str, WorkerHandle] = {}
        self._tls = tls  # mutual TLS of every channel to a worker; None: plain gRPC
        self._mux = mux  # RouterConfig.worker_mux
        self._drain_wait_s = drain_wait_s
        self._interval_ms = load_interval_ms
        self._stale_s = stale_s
        self._closing: set[asyncio.Task[None]] = set()
        self.lost = LostWorkers()  # workers that died serving, for a bounded wait (restarts.py)
        self.gone = GoneWorkers()  # workers that left, for `epdserve status` (gone.py)
        self.starting = StartingWorkers()  # listed, not yet serving: no handle (starting.py)

    def on_membership(self, instances: dict[str, InstanceInfo]) -> None:
        """MembershipWatcher listener: create, update and drop handles."""
        now = time.monotonic()
        for iid in list(self.handles):
            info = instances.get(iid)
            old = self.handles[iid]
            if info is None and old.reachable(now) and not old.departed_for_good(now):
                # NOTE: its lease expired while it still answers (etcd was down or stalled):
                # it registers again within seconds, keep routing to it meanwhile (dropping
                # it left a cluster with no usable worker for that long). A worker leaving on
                # purpose drains first, and its load reports say so.
                if not old.departed_at:
                    log.info("worker %s left etcd but still answers; kept for now", iid)
                    old.departed_at = now
                continue
            if info is None or (
                info.incarnation != old.info.incarnation or info.address != old.info.address
            ):
                log.info("worker %s left (or restarted)", iid)
                self._close_later(self.handles.pop(iid))
        for iid, info in instances.items():
            if info.state == STARTING:  # no address yet; a restarted one's old handle is closed
                continue
            if iid in self.handles:
                self.handles[iid].info = info  # role, epoch, draining updates
                self.handles[iid].departed_at = 0.0
                continue
            log.info("worker %s joined at %s (role %s)", iid, info.address, info.role)
            self.gone.forget(iid)
            handle = WorkerHandle(info, self._interval_ms, self._stale_s, self._tls, self._mux)
            handle.on_gone = self._gone
            handle.start()
            self.handles[iid] = handle
        self.starting.update(instances)

    def _gone(self, handle: WorkerHandle) -> None:
        """A worker that left etcd stopped answering or stayed away too long: drop it."""
        if self.handles.get(handle.id) is handle:
            log.info("worker %s left", handle.id)
            self._close_later(self.handles.pop(handle.id))

    def _close_later(self, handle: WorkerHandle) -> None:
        self.gone.record(handle.info)
        if handle.state == "serving":  # not draining, asleep, flipping or loading: it died
            models = (handle.info.model, *handle.lora_adapters)
            self.lost.record(handle.info.role, models, handle.max_model_len)
        task = asyncio.get_running_loop().create_task(handle.close(self._drain_wait_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def candidates(self, role: str = "mixed", model: str | None = None) -> list[WorkerHandle]:
        """The usable workers of ``role`` serving ``model``. NOTE: one whose load report is
        late but who answers (``WorkerHandle.reachable``) ranks below every worker with a
        fresh report: it is chosen only when no such worker is left, rather than refused."""
        now = time.monotonic()
        usable = sorted(
            (
                h
                for h in self.handles.values()
                if h.info.role == role and h.usable_for(role, now) and h.serves(model)
            ),
            key=lambda h: h.id,
        )
        return [h for h in usable if h.load_fresh(now)] or usable

    def serving(self, role: str, model: str | None = None) -> list[WorkerHandle]:
        """Workers of ``role`` that serve (not draining nor mid-flip), usable or not: one
        out of routing only until its next load report (after a failed call) or its first
        one (just registered) is among them."""
        return [
            h
            for h in self.handles.values()
            if h.info.role == role and h.state == "serving" and h.serves(model)
        ]

    def may_serve(self, model: str) -> bool:
        """Serving workers (usable now or not) make a path for ``model``: a mixed worker,
        or a prefill worker and a decode worker."""
        return bool(self.serving("mixed", model)) or (
            bool(self.serving("prefill", model)) and bool(self.serving("decode", model))
        )

    def models(self) -> dict[str, int]:
        """Served model names of known workers -> the smallest context length among them."""
        out: dict[str, int] = {}
        for h in self.handles.values():
            cur = out.get(h.info.model)
            out[h.info.model] = h.max_model_len if cur is None else min(cur, h.max_model_len)
        return out

    def adapters(self) -> dict[str, str]:
        """LoRA adapters some known worker holds -> the base model they adapt."""
        return {a: h.info.model for h in self.handles.values() for a in h.lora_adapters}

    def asleep(self, model: str) -> bool:
        """Waking ``model``'s sleeping workers would make a path for it: some sleep (or are
        waking up), and a mixed worker or a prefill and a decode worker are among them and
        the serving ones. NOTE: a PD model with only one side asleep is asleep too (its
        requests wait for that side, where "every worker sleeps" sent them a no_workers 503
        at once)."""
        workers = self._workers_of(model)
        if not any(h.state == "sleeping" for h in workers):
            return False
        roles = {h.info.role for h in workers if h.state in ("serving", "sleeping")}
        return "mixed" in roles or {"prefill", "decode"} <= roles

    def to_wake(self, model: str) -> list[WorkerHandle]:
        """The sleeping workers of ``model`` to wake for a path to it: one mixed worker, or
        one of each PD side that has no serving worker (empty: waking makes no path)."""
        workers = self._workers_of(model)
        sleeping = sorted((h for h in workers if h.state == "sleeping"), key=lambda h: h.id)
        mixed = [h for h in sleeping if h.info.role == "mixed"]
        if mixed:
            return mixed[:1]
        serving = {h.info.role for h in workers if h.state == "serving"}
        picked = []
        for role in ("prefill", "decode"):
            if role in serving:
                continue
            of_role = [h for h in sleeping if h.info.role == role]
            if not of_role:
                return []
            picked.append(of_role[0])
        return picked

    def _workers_of(self, model: str) -> list[WorkerHandle]:
        base = self.base_model(model)
        return [h for h in self.handles.values() if h.info.model == base]

    def all_in(self, model: str, state: str) -> bool:
        """Every known worker of ``model``'s base model advertises ``state``."""
        base = self.base_model(model)
        workers = [h for h in self.handles.values() if h.info.model == base]
        return bool(workers) and all(h.info.state == state for h in workers)

    def base_model(self, model: str) -> str:
        """The base model a request for ``model`` runs on: its parent for a LoRA adapter."""
        if any(h.info.model == model for h in self.handles.values()):
            return model
        return self.adapters().get(model, model)

    def lora_of(self, model: str) -> str:
        """The adapter a request for ``model`` runs with: ``model`` when it names an adapter
        (not a base model), else ""."""
        bases = {h.info.model for h in self.handles.values()}
        return model if model not in bases and model in self.adapters() else ""

    async def close(self) -> None:
        for h in list(self.handles.values()):
            await h.close()
        self.handles.clear()
        for task in self._closing:
            task.cancel()  # router shutdown: do not wait for departed workers' requests
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
