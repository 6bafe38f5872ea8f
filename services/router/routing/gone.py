"""Workers that left the router's view, remembered for a while so that the operator sees
what went and how long ago (``epdserve status``), not just a shorter list."""

from __future__ import annotations

import time
from typing import Any

from services.common.membership import InstanceInfo

# A worker gone longer than this is no longer shown (its id may never come back).
GONE_SHOWN_S = 3600.0


class GoneWorkers:
    """The last advertisement of each worker id that left, and when it left; an id that
    registers again is no longer gone."""

    def __init__(self) -> None:
        self._left: dict[str, tuple[InstanceInfo, float]] = {}

    def record(self, info: InstanceInfo) -> None:
        now = time.monotonic()
        self._left = {i: v for i, v in self._left.items() if now - v[1] < GONE_SHOWN_S}
        self._left[info.id] = (info, now)

    def forget(self, worker_id: str) -> None:
        self._left.pop(worker_id, None)

    def infos(self, model: str) -> list[InstanceInfo]:
        """The last advertisements of the workers of ``model`` that left, newest first."""
        left = sorted(self._left.values(), key=lambda v: -v[1])
        return [info for info, _ in left if info.model == model]

    def rows(self) -> list[dict[str, Any]]:
        """What ``/admin/status`` shows of each: who it was and ``for_s``, seconds gone."""
        now = time.monotonic()
        return [
            {"id": i, "role": info.role, "model": info.model, "address": info.address,
             "pid": info.pid, "host": info.host, "for_s": round(now - at, 1)}
            for i, (info, at) in sorted(self._left.items()) if now - at < GONE_SHOWN_S
        ]  # fmt: skip
