"""Workers that are starting: their process runs and holds its etcd key, advertising state
"starting" (worker/starting.py), while it imports and loads its model (seconds to minutes).

They have no address yet, so the pool makes no handle (no channel, no load stream) for them;
it keeps them here instead. A request for a model whose only workers are starting waits for
one (bounded by the start budget, ``RouterConfig.worker_restart_wait_s``, and the request's
deadline) instead of a 404 or 503, ``/admin/status`` lists them with how long they have been
starting, and a 503 that ends such a wait says in Retry-After what is left of the budget. A
worker that dies while starting takes its key with it (its lease runs out): it is dropped.
"""

from __future__ import annotations

import math
import time
from typing import Any

from services.common.membership import InstanceInfo

STARTING = "starting"  # the advertised state (common/membership.WORKER_STATES)


class StartingWorkers:
    """The starting workers in etcd, each with when this router first saw it starting."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[InstanceInfo, float]] = {}

    def update(self, instances: dict[str, InstanceInfo]) -> None:
        """The membership listing changed: keep the ids that advertise "starting"."""
        now = time.monotonic()
        fresh: dict[str, tuple[InstanceInfo, float]] = {}
        for iid, info in instances.items():
            if info.state != STARTING:
                continue
            old = self._seen.get(iid)
            same = old is not None and old[0].incarnation == info.incarnation
            fresh[iid] = (info, old[1]) if same and old is not None else (info, now)
        self._seen = fresh

    def models(self) -> dict[str, int]:
        """Models of starting workers -> the context length they advertise (0: not known
        before the model is loaded; a request waits for the worker, which then says)."""
        out: dict[str, int] = {}
        for info, _ in self._seen.values():
            out[info.model] = int(info.capacity.get("max_model_len", 0) or 0)
        return out

    def coming(self, role: str, model: str, budget_s: float) -> bool:
        """A worker of ``role`` serving ``model`` has been starting for less than
        ``budget_s``: it may serve soon (one starting longer is stuck or very slow)."""
        now = time.monotonic()
        return any(info.role == role and info.model == model and now - at < budget_s
                   for info, at in self._seen.values())  # fmt: skip

    def has(self, model: str) -> bool:
        """Some worker serving ``model`` is starting."""
        return any(info.model == model for info, _ in self._seen.values())

    def wait_left(self, model: str, budget_s: float) -> int | None:
        """Whole seconds (rounded up) until the newest start of a worker of ``model`` is
        ``budget_s`` old: the Retry-After of a 503 that ended a wait for it (None: none is
        starting within its budget)."""
        now = time.monotonic()
        left = max((budget_s - (now - at) for info, at in self._seen.values()
                    if info.model == model), default=0.0)  # fmt: skip
        return math.ceil(left) if left > 0 else None

    def rows(self) -> list[dict[str, Any]]:
        """What ``/admin/status`` shows of each: who it is and ``for_s``, seconds starting."""
        now = time.monotonic()
        return [
            {"id": i, "role": info.role, "model": info.model, "pid": info.pid,
             "host": info.host, "for_s": round(now - at, 1)}
            for i, (info, at) in sorted(self._seen.items())
        ]  # fmt: skip
