"""Sleep and wake-up of a worker (xLLM's model sleep): ``epdserve models sleep WORKER`` reaches
the ``Sleep`` RPC through the router's admin API.

Sleeping drains the worker as a role change does (it advertises "flipping", finishes or, past
the drain timeout, aborts what it holds), then its engine gives the weights' and the KV
cache's memory back (``engine/sleep.py``) and it advertises "sleeping": routers send it
nothing, and a request for a model with no awake worker gets a 503 with Retry-After. Waking
reads the weights back and it serves again (same role, same epoch).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from services.common.proto import worker_pb2 as pb
from services.engine.sleep import EngineSleep, SleepReport
from services.worker.errors import BAD_REQUEST, Rules, Status, call_status

if TYPE_CHECKING:
    from services.engine.async_engine import AsyncLLMEngine
    from services.worker.role_controller import RoleController
    from services.worker.state import WorkerState

log = logging.getLogger(__name__)


class Busy(Exception):
    """A sleep asked only if idle found requests in flight."""


# A spill file that cannot be written (a full or missing --sleep-dir): the worker serves on.
SLEEP: Rules = {
    Busy: Status(grpc.StatusCode.FAILED_PRECONDITION, "busy, not going to sleep: "),
    ValueError: BAD_REQUEST,
    OSError: Status(grpc.StatusCode.FAILED_PRECONDITION, "cannot write the weights out: "),
}


class WorkerSleep:
    """Serialises the sleeps and wake-ups of one worker with its role changes (one lock: a
    role change finishing while the engine goes to sleep would advertise it serving)."""

    def __init__(self, state: WorkerState, engine: AsyncLLMEngine, roles: RoleController) -> None:
        self.state = state
        self.engine = engine
        self.roles = roles
        self.engine_sleep = EngineSleep()  # main.py sets its folder (--sleep-dir)

    async def set(self, sleep: bool, if_idle: bool = False) -> SleepReport:
        """Sleep (``sleep``) or wake up; nothing to do when already so. ValueError: this
        engine cannot sleep; Busy: ``if_idle`` and a request is in flight."""
        async with self.roles.lock:
            if sleep == self.state.asleep:
                return SleepReport(0, 0, 0.0)
            return await (self._sleep(if_idle) if sleep else self._wake())

    async def _sleep(self, if_idle: bool) -> SleepReport:
        st = self.state
        await self.engine.call(EngineSleep.supported)  # refuse before draining anything
        # NOTE: no await between this check and the drain flag below: a request that comes
        # after it is refused, one before it is seen here.
        if if_idle and st.inflight:
            raise Busy(f"{len(st.inflight)} requests in flight")
        log.info("going to sleep: draining")
        st.flipping = True
        st.on_change()
        try:
            await self.roles.drain("went to sleep")
            report = await self.engine.call(self.engine_sleep.sleep)
            st.asleep = True
        finally:
            st.flipping = False
            st.on_change()
        return report

    async def _wake(self) -> SleepReport:
        report = await self.engine.call(self.engine_sleep.wake_up)
        self.state.asleep = False
        self.state.on_change()
        log.info("awake: serving as %s again", self.state.role)
        return report


class SleepRPCs:
    """``Sleep`` of the WorkerService (mixed into its servicer)."""

    sleeper: WorkerSleep

    async def Sleep(  # noqa: N802 - gRPC method name
        self, request: pb.SleepRequest, context: grpc.aio.ServicerContext
    ) -> pb.SleepResponse:
        async with call_status(context, SLEEP):
            r = await self.sleeper.set(request.sleep, request.if_idle)
        return pb.SleepResponse(sleeping=self.sleeper.state.asleep, weight_bytes=r.weight_bytes,
                                kv_bytes=r.kv_bytes, seconds=r.seconds)  # fmt: skip
