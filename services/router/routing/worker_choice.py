"""How the orchestrator picks workers for a request: the policy's choice among the usable
workers of a role (a mixed worker, or a prefill/decode pair), offline work kept to workers with
headroom, a short wait when none is usable but some serve, and a bounded one for a worker that
died to be restarted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet

from services.common.proto import worker_pb2 as pb
from services.engine.service_tiers import DEFAULT, FLEX
from services.router.routing.kv_index import KVIndexClient
from services.router.routing.lora_affinity import DEFAULT_SLACK, note_routed, prefer_resident
from services.router.routing.pd import PDRequest, pair_of_one_size
from services.router.routing.poison import PoisonTracker
from services.router.routing.policies.base import RouteRequest, RoutingPolicy
from services.router.routing.retry import AttemptFailed, Attempts
from services.router.routing.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)


class WorkerChoice:
    """The worker choice of ``Orchestrator`` (its base class): it reads ``pool``, ``policy``,
    ``kv_index`` and ``has_room``, which the orchestrator sets."""

    pool: WorkerPool
    policy: RoutingPolicy
    kv_index: KVIndexClient | None
    # Whether a worker has headroom for offline (flex) work (offline.py); None: any has.
    has_room: Callable[[WorkerHandle], bool] | None

    # A request finding no usable worker while some serve (one out of routing only until its
    # next load report after a failed call, or just registered) waits this long for one.
    WORKER_WAIT_S = 5.0
    WORKER_POLL_S = 0.05
    # After a worker died running the request, a worker that sent a load report since is
    # preferred, for up to this many report intervals: one killed together with it (a host's
    # OOM killer, two workers SIGKILLed at once) may not be seen closing yet, and the request
    # placed there died again before it could run: a second death, poison (80 ms apart in
    # session 21's trial, a connection reset still in flight).
    FRESH_AFTER_DEATH_REPORTS = 2
    # A request finding no worker of a role where one died serving waits this long for it to
    # be restarted (RouterConfig.worker_restart_wait_s; 0: fail at once).
    restart_wait_s = 0.0
    # The deadline of a request's generation (RouterConfig.request_timeout_s): a wait for a
    # restart ends at it too, whichever comes first.
    timeout_s = float("inf")
    # LoRA affinity (lora_affinity.py): how much busier, in requests, a worker holding a
    # request's adapter in a slot may be than the least-loaded one and still be preferred.
    lora_slack = DEFAULT_SLACK

    def _for_tier(self, candidates: list[WorkerHandle], tier: str) -> list[WorkerHandle]:
        """The candidates an offline request may go to: those with headroom, when any has
        (the admission gate found one; it may have filled since), else all of them."""
        if tier != FLEX or self.has_room is None:
            return candidates
        return [h for h in candidates if self.has_room(h)] or candidates

    async def _route(
        self,
        model: str,
        request_id: str,
        prompt: Sequence[int],
        candidates: list[WorkerHandle],
        images: Sequence[pb.ImageData] = (),
    ) -> RouteRequest:
        """The policy's view of the request; a cache-aware policy also gets each candidate's
        cached prefix of the prompt from the global KV index."""
        lora = self.pool.lora_of(model)
        route = RouteRequest(request_id, len(prompt), prompt, [i.hash for i in images], lora)
        if self.kv_index is not None and self.policy.uses_kv_index:
            base = self.pool.adapters()[lora] if lora else model  # the index keys base models
            await self.kv_index.annotate(route, base, candidates)
        return route

    def pd_available(self, model: str) -> bool:
        return bool(self.pool.candidates("prefill", model)) and bool(
            self.pool.candidates("decode", model)
        )

    async def _use_pd(self, model: str) -> bool:
        """Whether to run on a PD pair (else on a mixed worker). While neither is usable but
        workers that serve are known, wait for one (``_usable``); while a path to ``model``
        may come back from a restart (``_restarting``), wait for it too."""
        start = time.monotonic()
        while not (pd := self.pd_available(model)) and not self.pool.candidates("mixed", model):
            waited = time.monotonic() - start
            if self.pool.may_serve(model) and waited < self.WORKER_WAIT_S:
                pass
            elif not self.path_coming(model, waited):
                break
            await asyncio.sleep(self.WORKER_POLL_S)
        return pd  # NOTE: as of the last check (no await since)

    def path_coming(self, model: str, waited: float) -> bool:
        """A mixed worker, or both a prefill and a decode worker, of ``model`` are listed
        or may come back from a restart (``_restarting``)."""

        def coming(role: str) -> bool:
            return self._restarting(role, model, waited, bool(self.pool.serving(role, model)))

        return coming("mixed") or (coming("prefill") and coming("decode"))

    def _restarting(self, role: str, model: str, waited: float, listed: bool = False) -> bool:
        """A worker of ``role`` for ``model`` may come back within the restart wait, and a
        request that ``waited`` that long may still wait for it: one died serving less than
        ``restart_wait_s`` ago (its supervisor restarts it), one is ``listed`` but out of
        routing (its load stream broke: dead, and its etcd key not yet expired), or one is
        starting, for less than ``restart_wait_s`` (routing/starting.py). The wait ends at
        the request's ``timeout_s`` too."""
        if waited >= min(self.restart_wait_s, self.timeout_s):
            return False
        return (
            listed
            or self.pool.lost.since(role, model) < self.restart_wait_s
            or self.pool.starting.coming(role, model, self.restart_wait_s)
        )

    def _down(self, role: str, model: str) -> bool:
        """A listed worker of ``role`` lost its load stream: it died (its etcd key not yet
        expired) or hangs, and may be restarted."""
        return any(not h.reachable() for h in self.pool.serving(role, model))

    async def _usable(
        self, role: str, model: str, exclude: AbstractSet[str], down: AbstractSet[str] = frozenset()
    ) -> list[WorkerHandle]:
        """The usable workers of ``role`` outside ``exclude`` (WorkerHandle.process). NOTE: when there are none but
        some of them serve, wait for one (up to WORKER_WAIT_S): a worker is out of routing
        from a failed call until its next load report (a fraction of a second) and from
        registering until its first, and a request arriving then, with the only other
        worker just died, must not fail for that. When one died, wait up to
        ``restart_wait_s`` for it to be restarted (the request then goes on there: a stream
        whose only decode worker was killed resumes on its restarted process). A process in
        ``down`` (it died or hung on this request) that is usable again while the request
        waits for a restart stalled and recovered: no restart will come, so it is tried again
        (``max_attempts`` and the poison tracker still bound the request)."""
        start = time.monotonic()
        waited_for: str | None = None
        died_at = PoisonTracker.died_at()
        while True:
            found = [h for h in self.pool.candidates(role, model) if h.process not in exclude]
            waited = time.monotonic() - start
            if found and died_at:
                fresh = [h for h in found if h.alive_at > died_at]
                hold_s = max(h.interval_ms for h in found) * self.FRESH_AFTER_DEATH_REPORTS / 1e3
                if fresh or waited >= hold_s:
                    return fresh or found
                await asyncio.sleep(self.WORKER_POLL_S)  # for a report (a fraction of a second)
                continue
            if found:
                return found
            serving = [h.id for h in self.pool.serving(role, model) if h.process not in exclude]
            if serving and waited < self.WORKER_WAIT_S:
                why = f"one of {serving}"
            elif self._restarting(role, model, waited, bool(serving) or self._down(role, model)):
                back = [h for h in self.pool.candidates(role, model) if h.process in down]
                if back:
                    log.info("%s worker %s is back by itself; trying it again", role, back[0].id)
                    return back
                why = f"a restarted one, up to {self.restart_wait_s:g} s"
            else:
                if waited_for:
                    log.warning("no %s worker for %s after %.1f s", role, model, waited)
                return found
            if waited_for != why:
                log.info("no %s worker usable now; waiting for %s", role, why)
                waited_for = why
            await asyncio.sleep(self.WORKER_POLL_S)

    async def _choose(
        self,
        model: str,
        request_id: str,
        prompt: Sequence[int],
        images: Sequence[pb.ImageData],
        attempts: Attempts,
        tier: str = DEFAULT,
    ) -> WorkerHandle | None:
        """The policy's mixed worker for the request's next attempt (None: none is usable)."""
        candidates = self._for_tier(
            await self._usable("mixed", model, attempts.tried, attempts.down), tier
        )
        if not candidates:
            return None
        lora = self.pool.lora_of(model)
        candidates = prefer_resident(candidates, lora, self.lora_slack)
        route = await self._route(model, request_id, prompt, candidates, images)
        chosen = self._listed(self.policy.select(candidates, route))
        note_routed(chosen, lora)
        return chosen

    async def _choose_pair(
        self, request_id: str, request: PDRequest, attempts: Attempts
    ) -> tuple[WorkerHandle, WorkerHandle] | None:
        """The policy's (prefill, decode) pair for the request's next attempt, suspects on
        the decode side only if no other is usable (None: no pair is usable)."""
        tier = request.params.service_tier
        prefills = self._for_tier(
            await self._usable("prefill", request.model, attempts.tried, attempts.down), tier
        )
        decodes = self._for_tier(
            await self._usable("decode", request.model, attempts.tried, attempts.down), tier
        )
        decodes = [h for h in decodes if h.id not in attempts.suspects] or decodes
        if not prefills or not decodes:
            return None
        lora = self.pool.lora_of(request.model)
        prefills = prefer_resident(prefills, lora, self.lora_slack)
        decodes = prefer_resident(decodes, lora, self.lora_slack)
        route = await self._route(
            request.model, request_id, request.prompt, [*prefills, *decodes], request.images
        )
        p, d = pair_of_one_size(self.policy, prefills, decodes, route)
        self._listed(p)
        self._listed(d)
        note_routed(p, lora)
        note_routed(d, lora)
        return p, d

    def _listed(self, handle: WorkerHandle) -> WorkerHandle:
        """``handle``, or ``AttemptFailed`` when it left the cluster while the policy chose
        (the KV index lookup awaits)."""
        if self.pool.handles.get(handle.id) is not handle:
            raise AttemptFailed()
        return handle
