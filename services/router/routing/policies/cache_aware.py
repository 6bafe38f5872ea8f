"""Cache aware: the worker where the request costs least, counting the prompt tokens it
already holds (from the global KV index) against the work queued there.

Cost of worker w, in prompt tokens of compute (lower is better), after Dynamo's KV router
(``overlap_weight * prefill_blocks + active_blocks``) and xLLM's cache-aware policy:

    saved(w) = device + HOST_WEIGHT * (host - device) + STORE_WEIGHT * (total - host)
    cost(w)  = overlap_weight * (prompt_tokens - saved(w))      # what it must compute
               + queued prefill tokens(w)                       # what it must compute first
               + request_tokens * requests in flight(w)         # its running batch
               + KV_FULL_TOKENS * KV utilisation(w)             # room before preempting

A worker holding the prefix keeps the request until the work queued there outweighs the
recompute it saves; with no cache information (kvstore down) this is a least-load policy.
A request in flight counts as ``request_tokens`` (default 128): decoding one more sequence
costs far less than prefilling a prompt, so a busy holder still beats an idle stranger for
a long shared prefix. Tokens fetched from the host pool or the store are cheaper than
computing them but not free, hence their weights below 1. Equal costs rotate.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.router.routing.policies.base import (
    CachedPrefix,
    RouteRequest,
    RoutingPolicy,
    WorkerT,
    WorkerView,
    reported_load,
)

HOST_WEIGHT = 0.7  # a block copied back from host memory saves most of its compute
STORE_WEIGHT = 0.4  # a block fetched over the network from Mooncake Store saves less
KV_FULL_TOKENS = 512.0  # cost of a full KV cache (new requests would preempt)
DECODE_OVERLAP_FRACTION = 0.1
NO_CACHE = CachedPrefix()


def saved_tokens(c: CachedPrefix) -> float:
    return c.device + HOST_WEIGHT * (c.host - c.device) + STORE_WEIGHT * (c.total - c.host)


class CacheAwarePolicy(RoutingPolicy):
    name = "cache_aware"
    uses_kv_index = True

    def __init__(self, overlap_weight: float = 1.0, request_tokens: float = 128.0) -> None:
        self.overlap_weight = overlap_weight
        self.request_tokens = request_tokens
        # Rotation among equal costs, per side: select_pair picks twice per request, and one
        # shared counter would then always give the same parity to the prefill side.
        self._turns = {"prefill": 0, "decode": 0}

    def load_tokens(self, w: WorkerView) -> float:
        """Work already on ``w``, in prompt tokens. The router's own in-flight count is
        current; the worker's report also covers other routers' requests."""
        rep = w.load
        if rep is None:
            return self.request_tokens * w.inflight
        inflight, waiting = reported_load(w, rep)
        return waiting + self.request_tokens * inflight + KV_FULL_TOKENS * rep.kv_utilization

    def cost(self, w: WorkerView, request: RouteRequest, overlap_weight: float) -> float:
        cached = request.cached.get(w.id, NO_CACHE)
        uncached = max(0.0, request.num_prompt_tokens - saved_tokens(cached))
        return overlap_weight * uncached + self.load_tokens(w)

    def _cheapest(
        self,
        candidates: Sequence[WorkerT],
        request: RouteRequest,
        overlap_weight: float,
        side: str = "prefill",
    ) -> WorkerT:
        costs = [self.cost(w, request, overlap_weight) for w in candidates]
        best = min(costs)
        tied = [w for w, c in zip(candidates, costs, strict=True) if c - best < 1e-6]
        self._turns[side] += 1
        return tied[self._turns[side] % len(tied)]

    def select(self, candidates: Sequence[WorkerT], request: RouteRequest) -> WorkerT:
        return self._cheapest(candidates, request, self.overlap_weight)

    def select_pair(
        self,
        prefills: Sequence[WorkerT],
        decodes: Sequence[WorkerT],
        request: RouteRequest,
    ) -> tuple[WorkerT, WorkerT]:
        """The prefill side computes the prompt, so the cache matters most there; a decode
        worker's cached prefix only spares part of the KV transfer, so the decode side
        counts the overlap at DECODE_OVERLAP_FRACTION of its weight."""
        return (
            self._cheapest(prefills, request, self.overlap_weight),
            self._cheapest(
                decodes, request, self.overlap_weight * DECODE_OVERLAP_FRACTION, "decode"
            ),
        )
