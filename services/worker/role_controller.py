"""Role changes of one worker: stop taking work of the old role, finish what it holds, switch,
bump the role epoch and re-advertise.

Both ways in go through ``RoleController.change``: the desired-role key in etcd (watched by
``DesiredRoleWatcher``, written by the router's rebalancer and admin API) and the SetRole RPC.
While a change is under way the worker advertises ``state="flipping"``: routers stop sending
it work and ``WorkerServicer._admit`` refuses new requests of the old role. Requests it already
holds (running streams, prefills, decode reservations) finish, bounded by ``drain_timeout_s``;
what remains after that is aborted with a clear error (request migration is a later step).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from services.common.aio import cancel_and_wait
from services.common.etcd_watch import follow_key
from services.common.grpc_utils import ROLES
from services.common.membership import role_key

log = logging.getLogger(__name__)

EVICTED_MESSAGE = "request aborted: worker {id} {what} (drain timeout {t:.0f}s)"


class StaleEpochError(Exception):
    """SetRole named an expected epoch the worker is no longer at."""


class RoleController:
    """Serialises role changes of one worker (``state`` is its ``WorkerState``).

    ``held`` counts the work the worker holds (in-flight requests plus decode reservations);
    ``evict`` aborts it all with a message; ``supports`` says whether a role can run here
    (prefill/decode need KV transfer).
    """

    POLL_S = 0.05

    def __init__(
        self,
        state,
        drain_timeout_s: float,
        held: Callable[[], int],
        evict: Callable[[str], Awaitable[None]],
        supports: Callable[[str], bool] = lambda role: True,
    ) -> None:
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._held = held
        self._evict = evict
        self._supports = supports
        # Held by a role change and by a sleep or wake-up (worker/sleep.py): each drains and
        # clears ``flipping`` when done, which must not end the other's refusal of new work.
        self.lock = asyncio.Lock()

    async def change(self, role: str, expected_epoch: int = 0) -> tuple[str, int]:
        """Converge to ``role``; returns (role, epoch). ValueError: a role that cannot run
        here; StaleEpochError: ``expected_epoch`` given and not current."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not self._supports(role):
            raise ValueError(f"role {role!r} needs KV transfer, which this worker has disabled")
        async with self.lock:
            st = self.state
            if expected_epoch and expected_epoch != st.role_epoch:
                raise StaleEpochError(
                    f"expected epoch {expected_epoch}, worker is at {st.role_epoch}"
                )
            if role == st.role:
                return st.role, st.role_epoch
            old = st.role
            log.info("role change %s -> %s: draining %d held requests", old, role, self._held())
            st.flipping = True
            st.on_change()
            try:
                await self.drain(f"changed role to {role}")
                st.role = role
                st.role_epoch += 1
            finally:
                st.flipping = False
                st.on_change()
            log.info("role changed %s -> %s (epoch %d)", old, role, st.role_epoch)
            return st.role, st.role_epoch

    async def drain(self, what: str) -> None:
        """Wait for the work held to finish, up to the drain timeout; then abort what is left,
        telling its callers the worker ``what`` (e.g. "changed role to decode")."""
        deadline = time.monotonic() + self.drain_timeout_s
        while self._held() and time.monotonic() < deadline:
            await asyncio.sleep(self.POLL_S)
        if self._held():
            msg = EVICTED_MESSAGE.format(id=self.state.instance_id, what=what,
                                         t=self.drain_timeout_s)  # fmt: skip
            log.warning("drain timeout: aborting %d requests", self._held())
            await self._evict(msg)


class DesiredRoleWatcher:
    """Watches ``/epdserve/<cluster>/roles/<id>`` and converges the worker to its value.

    Lists the key, then watches from the next revision; on any failure (etcd restart) it lists
    again, so a change made during an outage is still seen (etcd_watch.py). Only the latest
    desired role counts: a change that arrives during a flip is applied after it.
    """

    def __init__(
        self, endpoints: list[str], cluster: str, instance_id: str, controller: RoleController
    ) -> None:
        self.endpoints = endpoints
        self.key = role_key(cluster, instance_id)
        self.controller = controller
        self.desired: str | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        follows = follow_key(self.endpoints, self.key, self._listed, self._changed,
                             "desired-role watch")  # fmt: skip
        self._tasks = [
            asyncio.create_task(follows, name="desired-role-watch"),
            asyncio.create_task(self._converge_loop(), name="desired-role-converge"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    def _set(self, value: bytes | None) -> None:
        role = value.decode().strip() if value else None
        if role is not None and role not in ROLES:
            log.warning("ignoring desired role %r at %s", role, self.key)
            return
        if role is not None and role != self.desired:
            log.info("desired role is now %s", role)
        self.desired = role
        self._wake.set()

    def _listed(self, kvs: Sequence[Any]) -> None:
        self._set(kvs[0].value if kvs else None)

    def _changed(self, events: Sequence[Any]) -> None:
        for ev in events:
            self._set(ev.kv.value if ev.type == 0 else None)

    async def _converge_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            role = self.desired
            if role is None or role == self.controller.state.role:
                continue
            try:
                await self.controller.change(role)
            except ValueError as exc:
                log.error("cannot take desired role %s: %s", role, exc)
            except Exception:
                log.exception("role change to %s failed", role)
                await asyncio.sleep(1.0)
                self._wake.set()
