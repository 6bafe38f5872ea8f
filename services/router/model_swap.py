"""Waking sleeping models for the requests that wait for them (``--wake-asleep-models``), and
with ``--max-awake-models N`` swapping: the idlest awake model goes to sleep first.

Without a cap every router wakes what its own requests wait for (a wake-up never takes
anything from another model, so routers cannot work against each other). With a cap only the
election's leader swaps, from the requests waiting at every router (``waiting_board.py``):
two routers each swapping for their own requests would both see room under the cap and wake
two models, or put to sleep the model the other had just woken. A model woken (or asked for
here) less than ``MIN_AWAKE_S`` ago is never the one put to sleep: its waiting requests are
on their way to its workers, and their load reports do not show them yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from services.common.proto import worker_pb2 as pb
from services.router.config import RouterConfig
from services.router.routing.workers import WorkerHandle, WorkerPool
from services.router.waiting_board import WaitingBoard

log = logging.getLogger(__name__)

WAKE_TIMEOUT_S = 600.0  # a wake-up reads the weights back
# A model woken or asked for this recently is not put to sleep for another (see above).
MIN_AWAKE_S = 2.0
SWAP_TICK_S = 0.25  # how often the leader looks at the cluster's waiting requests
SEEN_AWAKE_S = 5.0  # a swap ends when this router sees the woken model serve, or after this


class ModelSwapper:
    """Wake-ups and swaps of one router (only the leader's swap, with a cap)."""

    def __init__(
        self, cfg: RouterConfig, pool: WorkerPool, board: WaitingBoard,
        is_leader: Callable[[], bool],
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.pool = pool
        self.board = board
        self.is_leader = is_leader
        # base model -> the wake-up (or swap) of its workers under way
        self._waking: dict[str, asyncio.Task[None]] = {}
        self._last_asked: dict[str, float] = {}  # base model -> when a request last resolved
        self._woken_at: dict[str, float] = {}  # base model -> when this router last woke it
        self._held: dict[str, int] = {}  # base model -> awake models when it last had to wait
        self._task: asyncio.Task[None] | None = None

    @property
    def swaps(self) -> bool:
        """Wake-ups may put another model to sleep (a cap is set)."""
        return self.cfg.wake_asleep_models and self.cfg.max_awake_models > 0

    async def start(self) -> None:
        if self.swaps:
            await self.board.start()
            self._task = asyncio.create_task(self._run(), name="model-swap")

    async def stop(self) -> None:
        tasks = [*filter(None, [self._task]), *self._waking.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.board.stop()

    def asked(self, model: str) -> None:
        """A request for ``model`` (a base model) resolved here."""
        self._last_asked[model] = time.monotonic()

    def wanted(self, model: str) -> None:
        """A request here waits for the sleeping ``model``: wake it, if this router may."""
        if not self.cfg.wake_asleep_models or (self.swaps and not self.is_leader()):
            return  # with a cap the leader swaps, from every router's waiting requests
        self._wake(model)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SWAP_TICK_S)
            if not self.is_leader():
                continue
            try:
                waiting = self.board.cluster_waiting()
                for model in sorted(waiting, key=lambda m: (-waiting[m], m)):
                    if self.pool.asleep(model):
                        self._wake(model)
            except Exception:
                log.exception("model swap round failed")

    def _wake(self, model: str) -> None:
        """Wake the sleeping workers that make a path for ``model`` (a mixed worker, or the
        sleeping sides of a prefill + decode pair), one wake-up task per model at a time.
        With ``max_awake_models`` reached, the idlest other model goes to sleep first (one
        such swap at a time); with none idle, nothing wakes."""
        picked = self.pool.to_wake(model)
        if model in self._waking or not picked:
            return
        cap = self.cfg.max_awake_models
        victims: list[WorkerHandle] = []
        if cap:
            if self._waking:
                return  # another swap may be freeing the room this one counts
            to_sleep = self._to_sleep(self.pool.base_model(model), cap)
            if to_sleep is None:
                return
            victims = to_sleep
        # NOTE: the task is the router's, not the waiting request's: a request cancelled
        # meanwhile (its client left) leaves the board at once, so no new swap starts for it,
        # but a swap begun runs to its end. Stopped half-way it would leave the victim asleep
        # and this model asleep too (neither serving); other requests, here or at other
        # routers, or the client's retry, may want the model; and an unused woken model is
        # the next idle victim (after MIN_AWAKE_S).
        task = asyncio.create_task(self._swap(model, victims, picked), name=f"wake-{model}")
        self._waking[model] = task
        task.add_done_callback(lambda _: self._waking.pop(model, None))

    def _to_sleep(self, model: str, cap: int) -> list[WorkerHandle] | None:
        """The awake workers of the model to put to sleep before ``model`` wakes: none
        under the cap; else the idlest other awake model's (nothing in flight or waiting on
        any of its workers nor at any router, not woken or asked for in the last
        MIN_AWAKE_S, the least recently asked for); None: every one is busy."""
        awake: dict[str, list[WorkerHandle]] = {}
        for h in self.pool.handles.values():
            if h.info.model != model and h.info.state == "serving":
                awake.setdefault(h.info.model, []).append(h)
        if len(awake) < cap:
            return []
        waiting = self.board.cluster_waiting()
        recent = time.monotonic() - MIN_AWAKE_S

        def idle(m: str) -> bool:
            last = max(self._last_asked.get(m, -float("inf")), self._woken_at.get(m, -float("inf")))
            # NOTE: reachable: a stopped or hung worker's last report says idle, and a Sleep
            # call to it waited WAKE_TIMEOUT_S (600 s), holding every other swap that long.
            return not waiting.get(m) and last < recent and all(
                h.load is not None and not h.load.num_inflight and not h.load.num_waiting
                and h.reachable() for h in awake[m]
            )  # fmt: skip

        idle_models = [m for m in awake if idle(m)]
        if not idle_models:
            if self._held.get(model) != len(awake):  # once, not at every tick
                log.info("model %s waits: %d models awake (the cap), none idle",
                         model, len(awake))  # fmt: skip
            self._held[model] = len(awake)
            return None
        self._held.pop(model, None)
        victim = min(idle_models, key=lambda m: (self._last_asked.get(m, 0.0), m))
        log.info("model %s wakes: model %s, the idlest of %d awake, goes to sleep first",
                 model, victim, len(awake))  # fmt: skip
        return awake[victim]

    async def _swap(
        self, model: str, asleep: list[WorkerHandle], awake: list[WorkerHandle]
    ) -> None:
        slept = await asyncio.gather(*(self._sleep_one(h) for h in asleep))
        if not all(slept):  # busy after all (a request the load reports had not shown yet)
            log.info("model %s waits: a worker of model %s is busy after all",
                     model, asleep[0].info.model)  # fmt: skip
            await asyncio.gather(
                *(self._wake_one(h) for h, ok in zip(asleep, slept, strict=True) if ok)
            )
            return
        await asyncio.gather(*(self._wake_one(h) for h in awake))
        self._woken_at[model] = time.monotonic()
        # Until this router sees it serve (its etcd entry), the model still looks asleep: a
        # second wake-up now would count the cap again.
        deadline = time.monotonic() + SEEN_AWAKE_S
        while not self.pool.may_serve(model) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    @staticmethod
    async def _sleep_one(h: WorkerHandle) -> bool:
        """Put ``h`` to sleep if it is idle; False: it is busy, or the call failed."""
        try:
            await h.stub.Sleep(pb.SleepRequest(sleep=True, if_idle=True), timeout=WAKE_TIMEOUT_S)
            return True
        except grpc.aio.AioRpcError as exc:
            log.warning("putting worker %s to sleep failed: %s", h.id, exc.details())
            return False

    @staticmethod
    async def _wake_one(h: WorkerHandle) -> None:
        log.info("waking worker %s (model %s)", h.id, h.info.model)
        try:
            await h.stub.Sleep(pb.SleepRequest(sleep=False), timeout=WAKE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.warning("waking worker %s failed: %s", h.id, exc.details())
