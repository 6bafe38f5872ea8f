"""Round robin: each request goes to the next worker in id order."""

from __future__ import annotations

from collections.abc import Sequence

from services.router.routing.policies.base import RouteRequest, RoutingPolicy, WorkerT


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, candidates: Sequence[WorkerT], request: RouteRequest) -> WorkerT:
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice

    def select_pair(
        self, prefills: Sequence[WorkerT], decodes: Sequence[WorkerT], request: RouteRequest
    ) -> tuple[WorkerT, WorkerT]:
        # One counter step per request, so that both sides rotate (not one side per step).
        i = self._next
        self._next += 1
        return prefills[i % len(prefills)], decodes[i % len(decodes)]
