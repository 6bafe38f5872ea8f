"""Workers that are starting: their process runs and holds its etcd key, advertising state
"starting" (worker/starting.py), while it imports and loads its model (seconds to minutes).

They have no address yet, so the pool makes no handle (no channel, no load stream) for them;
it keeps them here instead. A request for a model whose only workers are starting waits for
one (bounded by the start budget, ``RouterConfig.worker_restart_wait_s``, and the request's
deadline) instead of a 404 or 503, ``/admin/status`` lists them with how long they have been
starting, and a 503 that ends such a wait says in Retry-After what is left of the budget.

A worker that dies while starting is no longer waited for: its key vanishes when its lease
runs out (worker/starting.py: 15 s), and a router on its machine sees its process exit within
DEATH_POLL_S (its key names the process: common/process_id.py). Its model stays known for
the restart window (``worker_restart_wait_s`` from its death: ``epdserve up`` or Kubernetes
restarts it), so that a request for it gets the 503 no_workers with Retry-After, not a 404; its
restarted process, starting again, is waited for as any starting worker.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from services.common import process_id
from services.common.membership import InstanceInfo
from services.router.routing.restarts import MAX_RESTART_WAIT_S

log = logging.getLogger(__name__)

STARTING = "starting"  # the advertised state (common/membership.WORKER_STATES)
# How often the processes of starting workers on this machine are looked at (a few /proc
# reads each).
DEATH_POLL_S = 0.5
# The Retry-After of a 503 for a model whose worker died starting: `epdserve up` restarts it
# after its backoff (1 s, doubling on each restart up to --restart-backoff-max-s), and the new
# process announces itself within a second or two; a request then waits for it here. The
# router does not know the supervisor's backoff: a client comes back soon and, in a crash
# loop, is told again.
RESTART_RETRY_AFTER_S = 5


@dataclass
class _Start:
    info: InstanceInfo  # its advertisement
    since: float  # when this router first saw this process starting (monotonic)
    died: float | None = None  # when it was seen dead (its key gone, or its process)


class StartingWorkers:
    """The starting workers in etcd, each with when this router first saw it starting, and
    those that died starting, with when."""

    def __init__(self) -> None:
        self._seen: dict[str, _Start] = {}
        self._polled = 0.0  # when the local processes were last looked at

    def update(self, instances: dict[str, InstanceInfo]) -> None:
        """The membership listing changed: keep the ids that advertise "starting"; one whose
        key vanished died starting; one listed otherwise (registered, serving) started."""
        now = time.monotonic()
        fresh: dict[str, _Start] = {}
        for iid, info in instances.items():
            if info.state != STARTING:
                continue
            old = self._seen.get(iid)
            same = old is not None and old.info.incarnation == info.incarnation
            fresh[iid] = old if same and old is not None else _Start(info, now)
            fresh[iid].info = info
        for iid, old in self._seen.items():
            if iid not in instances and (old.died is None or now - old.died < MAX_RESTART_WAIT_S):
                fresh[iid] = old
                if old.died is None:
                    log.info("worker %s died while starting (its key is gone)", iid)
                    old.died = now
        self._seen = fresh

    def _alive(self) -> list[InstanceInfo]:
        """The advertisements of those still starting, once the processes on this machine
        that exited are marked dead (looked at every DEATH_POLL_S at most)."""
        now = time.monotonic()
        if now - self._polled >= DEATH_POLL_S:
            self._polled = now
            for iid, s in self._seen.items():
                if s.died is None and s.info.proc and process_id.gone(s.info.proc):
                    log.info("worker %s died while starting (pid %d exited)", iid, s.info.pid)
                    s.died = now
        return [s.info for s in self._seen.values() if s.died is None]

    def _dead(self, model: str, within_s: float) -> list[float]:
        """When the workers of ``model`` that died starting less than ``within_s`` ago died."""
        now = time.monotonic()
        return [s.died for s in self._seen.values()
                if s.died is not None and s.info.model == model and now - s.died < within_s]  # fmt: skip

    def models(self, within_s: float) -> dict[str, int]:
        """Models of starting workers, and of those that died starting less than
        ``within_s`` ago (a restart is due) -> the context length they advertise (0: not
        known before the model is loaded; a request waits for the worker, which then says)."""
        self._alive()
        now = time.monotonic()
        out: dict[str, int] = {}
        for s in self._seen.values():
            if s.died is None or now - s.died < within_s:
                out[s.info.model] = int(s.info.capacity.get("max_model_len", 0) or 0)
        return out

    def coming(self, role: str, model: str, budget_s: float) -> bool:
        """A worker of ``role`` serving ``model`` is starting, for less than ``budget_s``:
        it may serve soon (one starting longer is stuck or very slow)."""
        now = time.monotonic()
        return any(info.role == role and info.model == model
                   and now - self._seen[info.id].since < budget_s for info in self._alive())  # fmt: skip

    def is_starting(self, worker_id: str) -> bool:
        """Worker ``worker_id`` is starting (its key says so, and it was not seen dead)."""
        return any(info.id == worker_id for info in self._alive())

    def has(self, model: str) -> bool:
        """Some worker serving ``model`` is starting."""
        return any(info.model == model for info in self._alive())

    def wait_left(self, model: str, budget_s: float) -> int | None:
        """The Retry-After, in whole seconds (rounded up), of a 503 for ``model``: until the
        newest start of a worker of it is ``budget_s`` old, or, where the last one died
        starting less than ``budget_s`` ago, until its restart may be waited for (at most
        RESTART_RETRY_AFTER_S). None: none is starting within its budget nor due back."""
        now = time.monotonic()
        left = max((budget_s - (now - self._seen[info.id].since) for info in self._alive()
                    if info.model == model), default=0.0)  # fmt: skip
        if left <= 0 and (died := self._dead(model, budget_s)):
            left = min(float(RESTART_RETRY_AFTER_S), budget_s - (now - max(died)))
        return math.ceil(left) if left > 0 else None

    def rows(self) -> list[dict[str, Any]]:
        """What ``/admin/status`` shows of each still starting: who it is and ``for_s``,
        seconds starting."""
        self._alive()
        now = time.monotonic()
        return [
            {"id": i, "role": s.info.role, "model": s.info.model, "pid": s.info.pid,
             "host": s.info.host, "for_s": round(now - s.since, 1)}
            for i, s in sorted(self._seen.items()) if s.died is None
        ]  # fmt: skip
