"""Offline admission: requests of service tier ``flex`` wait in their own queue and are
admitted only while the cluster has headroom for them.

Online requests are charged against ``--max-queued-tokens`` and refused with 429 when it is
reached (admission.py); offline ones never count there. They have their own bounds: the
prompt tokens of offline requests held (waiting or running, ``--offline-max-queued-tokens``)
and the requests waiting (``--offline-max-waiting``) are capped (429 beyond them), at most
``--offline-max-running`` run at once, and one that waited ``--offline-queue-timeout-s`` is
answered 503 with Retry-After. The queue is FIFO; its head is admitted once

- a worker that could run it (mixed, or a prefill and a decode worker) reports at most
  ``--offline-headroom-tokens`` queued prompt tokens and a KV use of at most
  ``--offline-headroom-kv``, and
- that worker's recent online requests (tiers priority and default, from its load report)
  met the SLOs: their mean time to first token at most ``--slo-ttft-ms`` and mean time per
  output token at most ``--slo-tpot-ms`` (0 switches a check off); a worker that misses them
  gets no more offline work while the others may.

The admitted request is routed among the workers that have headroom (when none has any
left by then, among all: Orchestrator._for_tier). The engine then runs offline work in its
share of what online work leaves and preempts it first (services/engine/scheduler.py); this queue keeps offline work from piling into workers
that have no room, where it would only hold KV blocks and queue slots.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from services.common.latency import LatencyWindow
from services.router.errors import APIError

if TYPE_CHECKING:
    from services.router.config import RouterConfig
    from services.router.metrics import RouterMetrics
    from services.router.routing.workers import WorkerHandle, WorkerPool

POLL_S = 0.05  # how often the head of the queue looks for headroom


class OfflineTicket:
    """One admitted offline request's charge; ``release`` is idempotent."""

    def __init__(self, gate: OfflineAdmission, tokens: int) -> None:
        self._gate: OfflineAdmission | None = gate
        self.tokens = tokens

    def release(self) -> None:
        if self._gate is not None:
            self._gate.queued_tokens -= self.tokens
            self._gate.running -= 1
            self._gate = None


class OfflineAdmission:
    def __init__(self, cfg: RouterConfig, pool: WorkerPool, metrics: RouterMetrics) -> None:
        self.cfg, self.pool, self.metrics = cfg, pool, metrics
        self.queued_tokens = 0  # prompt tokens of offline requests waiting or running
        self.waiting = 0
        self.running = 0
        self.online_ttft_ms = LatencyWindow()  # of online requests served here, recently
        self.online_tpot_ms = LatencyWindow()
        self._turn = asyncio.Lock()  # FIFO: the holder is the head of the queue

    def observe_online(self, ttft_s: float, tpot_s: float | None) -> None:
        """An online request's time to first token and, with two outputs or more, per token."""
        self.online_ttft_ms.add(ttft_s * 1000.0)
        if tpot_s is not None:
            self.online_tpot_ms.add(tpot_s * 1000.0)

    def has_room(self, handle: WorkerHandle) -> bool:
        """Whether a worker's latest load report leaves room for offline work: few queued
        prompt tokens, KV to spare, and its online requests meeting the SLOs (the routing of
        an admitted offline request prefers such workers: Orchestrator._for_tier)."""
        cfg, load = self.cfg, handle.load
        return (
            load is not None
            and load.num_waiting_prompt_tokens <= cfg.offline_headroom_tokens
            and load.kv_utilization <= cfg.offline_headroom_kv
            and self.slo_met(load.recent_online_ttft_ms, load.recent_online_tpot_ms)
        )

    def slo_met(self, ttft_ms: float, tpot_ms: float) -> bool:
        """Whether online requests with these mean TTFT and TPOT meet the operator's SLOs.
        NOTE: checked per worker, on the worker's own online means (offline requests' slower
        latencies are theirs to have): one worker missing holds offline work off it only."""
        cfg = self.cfg
        return not (
            (cfg.slo_ttft_ms and ttft_ms > cfg.slo_ttft_ms)
            or (cfg.slo_tpot_ms and tpot_ms > cfg.slo_tpot_ms)
        )

    def has_headroom(self, model: str) -> bool:
        """Room for one more offline request of ``model`` now."""
        if self.running >= self.cfg.offline_max_running:
            return False

        def roomy(role: str) -> bool:
            return any(self.has_room(h) for h in self.pool.candidates(role, model))

        return roomy("mixed") or (roomy("prefill") and roomy("decode"))

    async def admit(self, model: str, tokens: int) -> OfflineTicket:
        """Wait for headroom, then a ticket for ``tokens`` prompt tokens; a 429 APIError past
        the offline bounds, a 503 after ``offline_queue_timeout_s`` without headroom."""
        cfg = self.cfg
        full = (
            self.queued_tokens > 0 and self.queued_tokens + tokens > cfg.offline_max_queued_tokens
        )
        if full or self.waiting >= cfg.offline_max_waiting:
            what = (f"{cfg.offline_max_queued_tokens} offline prompt tokens" if full
                    else f"{cfg.offline_max_waiting} waiting offline requests")  # fmt: skip
            raise APIError(429, f"the router is at its limit of {what}; retry later",
                           code="rate_limit_exceeded", headers={"Retry-After": "5"})  # fmt: skip
        self.waiting += 1
        self.queued_tokens += tokens
        started = time.monotonic()
        admitted = False
        try:
            async with asyncio.timeout(cfg.offline_queue_timeout_s), self._turn:
                while not self.has_headroom(model):
                    await asyncio.sleep(POLL_S)
                self.running += 1
                admitted = True
        except TimeoutError:
            raise APIError(
                503, f"no headroom for offline work in {cfg.offline_queue_timeout_s:g} s; retry "
                "later", headers={"Retry-After": "5"},
            ) from None  # fmt: skip
        finally:
            self.waiting -= 1
            if not admitted:
                self.queued_tokens -= tokens
        self.metrics.offline_queue.observe(time.monotonic() - started)
        return OfflineTicket(self, tokens)

    def status(self) -> dict[str, object]:
        """What ``/admin/status`` shows of offline work."""
        return {
            "waiting": self.waiting,
            "running": self.running,
            "queued_prompt_tokens": self.queued_tokens,
            # The online requests this router served, end to end (the gate checks each
            # worker's own online means: has_room).
            "slo_met": self.slo_met(self.online_ttft_ms.mean(), self.online_tpot_ms.mean()),
            "online_ttft_ms": round(self.online_ttft_ms.mean(), 2),
            "online_tpot_ms": round(self.online_tpot_ms.mean(), 2),
        }
