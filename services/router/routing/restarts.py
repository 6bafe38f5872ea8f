"""Workers that died while serving, remembered for a while: a request that finds no worker of
a role waits, bounded, for one to come back (``epdserve up`` or Kubernetes restarts it) rather
than failing at once (worker_choice.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

# How long the router waits by default for a worker of a role that died to come back: a
# restart (`epdserve up` restarts at once; a worker's start is ~5-20 s on a loaded 2-core
# machine with the default model) plus margin. RouterConfig.worker_restart_wait_s.
RESTART_WAIT_S = 60.0
MAX_RESTART_WAIT_S = 86400.0  # RouterConfig refuses longer waits


class LostWorkers:
    """When a worker of each (role, served model) last left the router's view while serving.
    The pool records only those: one that drained, flipped role, slept or went to load another
    model left on purpose."""

    def __init__(self) -> None:
        self._at: dict[tuple[str, str], float] = {}
        self._context: dict[str, int] = {}  # served model -> the lost worker's context length

    def record(self, role: str, models: Iterable[str], max_model_len: int) -> None:
        """A worker of ``role`` serving ``models`` (its base model and adapters) left the
        pool while serving: its etcd key vanished, or it registered again as a new process."""
        now = time.monotonic()
        for model in models:
            self._at[(role, model)] = now
            self._context[model] = max_model_len

    def since(self, role: str, model: str, now: float | None = None) -> float:
        """Seconds since a worker of ``role`` serving ``model`` was lost (inf: never)."""
        at = self._at.get((role, model))
        return float("inf") if at is None else (now or time.monotonic()) - at

    def models(self, within_s: float) -> dict[str, int]:
        """Served models of the workers lost less than ``within_s`` ago -> context length: a
        request for one of them waits for its restart even while no worker of it is left."""
        now = time.monotonic()
        return {m: self._context[m] for (_, m), at in self._at.items() if now - at < within_s}

    def wait_left(self, model: str, within_s: float) -> int | None:
        """Whole seconds (rounded up) until the newest loss of a worker serving ``model`` is
        ``within_s`` old, where the router stops waiting for its restart: the Retry-After of a
        503 that ended a wait early (None: no such wait is under way)."""
        now = time.monotonic()
        left = max((within_s - (now - at) for (_, m), at in self._at.items() if m == model),
                   default=0.0)  # fmt: skip
        return math.ceil(left) if left > 0 else None
