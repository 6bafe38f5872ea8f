"""Least load: the worker with the least queued work, from its load reports.

Score, lower is better: requests in flight (the larger of the router's own count, which
is current, and the worker's report, which also covers other routers), plus queued prefill
tokens in units of a typical prompt, plus KV utilisation to split ties towards free memory.
Equal scores rotate so that an idle cluster still spreads requests.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.router.routing.policies.base import (
    RouteRequest,
    RoutingPolicy,
    WorkerT,
    WorkerView,
    reported_load,
)

TYPICAL_PROMPT_TOKENS = 512.0


def load_score(w: WorkerView) -> float:
    rep = w.load
    if rep is None:
        return float(w.inflight)
    inflight, waiting = reported_load(w, rep)
    return inflight + waiting / TYPICAL_PROMPT_TOKENS + rep.kv_utilization


class LeastLoadPolicy(RoutingPolicy):
    name = "least_load"

    def __init__(self) -> None:
        self._turn = 0

    def select(self, candidates: Sequence[WorkerT], request: RouteRequest) -> WorkerT:
        scores = [load_score(w) for w in candidates]
        best = min(scores)
        tied = [w for w, s in zip(candidates, scores, strict=True) if s - best < 1e-6]
        self._turn += 1
        return tied[self._turn % len(tied)]
