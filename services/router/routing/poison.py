"""Poison-request detection: a request that workers keep dying on is not sent to another.

A request can fail on a worker in two ways the router sees. The worker says the request
failed because of itself (failure kind "request", see common/grpc_utils.py): the engine ended
that request alone and the worker is fine; such a request is never retried. Or the worker
vanished (killed, crashed, hung) while running it: the router cannot tell whether this request
or another one, or nothing at all (an OOM kill, a node lost), was the cause. Migration exists
for exactly that case, so a first death is retried elsewhere; but

- a request that killed ``max_deaths`` workers in turn is taken to be their cause and fails
  with a clear error instead of crashing the next worker, and the next. In turn: a death
  counts only on a worker the request was placed on after its previous counted death. The
  workers it ran on together when one died (a PD pair on a lost node, a decode worker whose
  prefill died) are one death, not two. NOTE: a worker here is a process
  (``WorkerHandle.process``): a worker restarted by its supervisor keeps its id, and the
  restarted process dying of the request again is another death;
- an identical request (same model, prompt, sampling parameters, images: a client's retry)
  is refused for ``ttl_s`` after one with its fingerprint was judged poison, while such
  judgements are at least half of the requests with it. NOTE: the share matters: a popular
  prompt (a health probe, a shared system prompt with temperature 0) is in flight on every
  worker that an operator restarts, and must not be blocked for that. NOTE: deaths of
  different requests are never summed: one worker killed under five identical requests in
  flight (a load generator's fixed prompts) is five victims of one death, not five deaths
  (the chaos suite's failure in session 18's CI);
- the streams of one client request (its ``n`` completions, a completions request's
  prompts) share their placements on workers (``Placements``): once one of them had a counted
  death, they are placed one at a time, each when the one before got its first message from
  its worker. Those placed at once before any death die together (up to one worker each),
  then one worker per death in turn: a poison request with n completions kills at most
  n + 1 workers (2 where the n run together on one), not 2n. Honest requests (no death)
  are placed as before, at once;
- a worker that was already silent when the request got to it froze or died of something
  else: its death is not the request's. Silent: the router had had no sign of life from it
  (``WorkerHandle.alive_at``: a load report or an answered health Check) for ``frozen_s``
  (half the router's ``load_stale_s``, past which its load stream asks it a health Check)
  before the request was placed there, and none since. NOTE: not a call's message: the
  router reads those at its clients' pace, seconds after a worker sent them (a frozen
  worker's streams were still read 4 s into its freeze, and it looked alive). Workers frozen together (a
  node's SIGSTOP, a host that stalls, a store that froze them: session 20's 8 streams
  failed as poison after a mooncake_master stop) are silent for seconds before the router
  takes them out of routing, and a request moved off one of them went to the next: two
  deaths. A query of death kills a worker that was answering when it got there.
"""

from __future__ import annotations

import array
import asyncio
import contextvars
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError

log = logging.getLogger(__name__)

# A worker silent this long when a request was placed on it had frozen or died already: half
# the router's default load_stale_s (RouterConfig sets it from its own).
FROZEN_S = 2.5


def fingerprint(
    model: str, prompt: Sequence[int], params: pb.SamplingParams, images: Sequence = ()
) -> str:
    """What makes two requests the same work for an engine: model, prompt, sampling
    parameters (seed included) and images (by content hash)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.encode())
    # NOTE: the ids as int64 bytes: 5x faster than joining their text, and this runs on
    # the event loop (a 1 MB prompt's 0.5 M ids: ~16 ms instead of ~90 ms).
    h.update(b"\0" + array.array("q", prompt).tobytes())
    h.update(b"\0" + params.SerializeToString(deterministic=True))
    for image in images:
        h.update(b"\0" + str(getattr(image, "hash", "")).encode())
    return h.hexdigest()


class Placements:
    """The placements on workers of one client request's streams (module docstring): at
    once until one of them had a counted death, then one at a time (``Turn``)."""

    def __init__(self) -> None:
        self.after_death = False
        self.error: APIError | None = None  # once one stream was judged poison: its error
        self._one = asyncio.Lock()


class Turn:
    """One attempt's turn to be placed (PoisonTracker.turn): ``async with`` it around the
    attempt and ``end`` it at the attempt's first message from its worker. Entering it
    raises the poison error where a stream of the request was judged poison meanwhile (do
    not place it: the request has failed)."""

    def __init__(self, placements: Placements | None) -> None:
        self._placements = placements
        self._held = False

    async def __aenter__(self) -> Turn:
        p = self._placements
        if p is not None and p.after_death:
            await p._one.acquire()
            self._held = True
            if p.error is not None:
                self.end()
                raise p.error
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.end()

    def end(self) -> None:
        """The attempt got its first message (or ended): the next one may be placed."""
        if self._held and self._placements is not None:
            self._held = False
            self._placements._one.release()


@dataclass
class RequestDeaths:
    """One request's count of the workers that died while running it."""

    fp: str
    placements: Placements = field(default_factory=Placements)  # shared with its siblings
    workers: set[str] = field(default_factory=set)  # every worker process that died running it
    deaths: int = 0  # of those, the deaths in turn (module docstring)
    # Worker process -> ``deaths`` when the request was first placed on it.
    placed: dict[str, int] = field(default_factory=dict)
    # Worker process -> when (tracker's clock) the request was first placed on it.
    placed_at: dict[str, float] = field(default_factory=dict)
    died_at: float = 0.0  # when a worker last died or hung running it, counted or not (0: never)


# The worker deaths of the request the current task runs: set by PoisonTracker.track (once
# per request, by Orchestrator.generate), counted where a worker's death is noticed.
_DEATHS: contextvars.ContextVar[RequestDeaths | None] = contextvars.ContextVar(
    "deaths", default=None
)


@dataclass
class _Seen:
    requests: int = 0  # requests with this fingerprint admitted
    poisoned: int = 0  # of those, the ones judged poison (``max_deaths`` deaths in turn)
    judged_at: float = float("-inf")  # when one last was
    last: float = 0.0  # last use of the entry (admitted, refused or judged)


class PoisonTracker:
    """Counts worker deaths per request and per request fingerprint."""

    def __init__(
        self,
        max_deaths: int = 2,
        ttl_s: float = 600.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        frozen_s: float = FROZEN_S,
    ) -> None:
        if max_deaths < 1:
            raise ValueError(f"max_deaths must be >= 1, got {max_deaths}")
        self.max_deaths = max_deaths
        # A worker silent this long when a request was placed on it was frozen or dying
        # already (module docstring); ``clock`` must be that of ``alive_at``.
        self.frozen_s = frozen_s
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self.refused = 0  # requests failed or refused as poison (a metric)

    def admit(self, fp: str, placements: Placements | None = None) -> RequestDeaths:
        """Start tracking a request (whose streams' ``placements`` may be shared with those
        of other requests: a client request's prompts); raises the poison APIError if
        ``fp`` is poison."""
        seen = self._entry(fp)
        left = self._refused_for(seen)
        if left > 0:
            self.refused += 1
            raise _error(self.max_deaths, "requests identical to this one were", fp, left)
        seen.requests += 1
        return RequestDeaths(fp, placements or Placements())

    def track(self, fp: str, placements: Placements | None = None) -> RequestDeaths:
        """``admit`` the current task's request, whose worker deaths ``note_current_death``
        then counts; raises the poison APIError if ``fp`` is poison. NOTE: a request whose
        steps run in several tasks (a stream: gateway's first step, then Starlette's body)
        must ``resume`` the returned deaths before each step: a context variable set in
        one task is not seen in another."""
        deaths = self.admit(fp, placements)
        self.resume(deaths)
        return deaths

    @staticmethod
    def resume(deaths: RequestDeaths) -> None:
        """Count the current task's worker deaths as ``deaths``' (see ``track``)."""
        _DEATHS.set(deaths)

    @staticmethod
    def died_at() -> float:
        """When a worker last died or hung running the current task's request (0: never, or
        no request tracked): worker_choice then prefers workers that reported since."""
        deaths = _DEATHS.get()
        return 0.0 if deaths is None else deaths.died_at

    @staticmethod
    def turn() -> Turn:
        """The turn of the current task's request's next attempt (``Turn``)."""
        deaths = _DEATHS.get()
        return Turn(None if deaths is None else deaths.placements)

    def note_current_placement(self, worker_id: str) -> None:
        """``note_placement`` for the current task's request (if ``track`` started one)."""
        deaths = _DEATHS.get()
        if deaths is not None:
            self.note_placement(deaths, worker_id)

    def note_current_death(self, worker_id: str, alive_at: float = 0.0) -> None:
        """``note_death`` for the current task's request (if ``track`` started one)."""
        deaths = _DEATHS.get()
        if deaths is not None:
            self.note_death(deaths, worker_id, alive_at)

    def note_placement(self, request: RequestDeaths, worker_id: str) -> None:
        """``request`` is sent to ``worker_id`` (a call starts): the first time only counts."""
        if worker_id not in request.placed:
            request.placed[worker_id] = request.deaths
            request.placed_at[worker_id] = self.clock()

    def note_death(self, request: RequestDeaths, worker_id: str, alive_at: float = 0.0) -> None:
        """The worker ``worker_id`` died or hung while running ``request``; raises the poison
        APIError if that makes the request poison (do not send it elsewhere). A worker it
        was placed on before its previous death died with that one (not in turn).
        ``alive_at``: the worker's latest sign of life (0: unknown); one silent since
        ``frozen_s`` before the request got there was frozen already: not counted."""
        request.died_at = self.clock()
        if worker_id in request.workers:
            return
        placed_at = request.placed_at.get(worker_id)
        if alive_at and placed_at is not None and alive_at < placed_at - self.frozen_s:
            log.info("worker %s was silent for %.1f s when a request (fingerprint %s) got "
                     "there: its death is not the request's", worker_id, placed_at - alive_at,
                     request.fp)  # fmt: skip
            return
        request.workers.add(worker_id)
        if request.placed.get(worker_id, request.deaths) < request.deaths:
            return
        request.deaths += 1
        request.placements.after_death = True
        if request.deaths >= self.max_deaths:
            seen = self._entry(request.fp)
            seen.poisoned += 1
            seen.judged_at = seen.last  # _entry's clock reading: now
            self.refused += 1
            err = _error(request.deaths, "this request was", request.fp, self._refused_for(seen))
            request.placements.error = err
            raise err

    def refusals(self) -> dict[str, float]:
        """The fingerprints refused now -> for how many more seconds (``admin_poison``)."""
        left = {fp: self._refused_for(seen) for fp, seen in self._seen.items()}
        return {fp: s for fp, s in left.items() if s > 0}

    def forget(self, fp: str | None = None) -> int:
        """Forget what was judged of ``fp`` (None: of every fingerprint): its requests are
        served again (an operator's call, once the workers' logs are read). Returns how many
        fingerprints were refused then."""
        refused = self.refusals()
        if fp is None:
            self._seen.clear()
            return len(refused)
        self._seen.pop(fp, None)
        return int(fp in refused)

    def _refused_for(self, seen: _Seen) -> float:
        """Seconds requests with ``seen``'s fingerprint are still refused (0: not refused):
        ``ttl_s`` from its latest judgement, while judgements are at least half its requests."""
        if not seen.poisoned or 2 * seen.poisoned < seen.requests:
            return 0.0
        return max(0.0, self.ttl_s - (self.clock() - seen.judged_at))

    def _entry(self, fp: str) -> _Seen:
        now = self.clock()
        seen = self._seen.get(fp)
        # NOTE: judged_at <= last (a judgement uses the entry), so this is past both.
        if seen is None or now - seen.last > self.ttl_s:
            seen = self._seen[fp] = _Seen()
        seen.last = now
        self._seen.move_to_end(fp)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return seen


def _error(deaths: int, who: str, fp: str, refused_s: float) -> APIError:
    """The poison error; ``refused_s``: how long identical requests are refused (0: not).
    Retry-After says when they are served again; ``x-should-retry: false`` keeps the OpenAI
    and Anthropic SDKs from resending it at once (they retry a 500 twice by default)."""
    message = (
        f"{who} running on {deaths} workers that died or stopped answering; it is not sent "
        "to another one. Change the request (prompt or sampling parameters)"
    )
    headers = {"x-should-retry": "false"}
    if refused_s > 0:
        wait = math.ceil(refused_s)
        headers["Retry-After"] = str(wait)
        message += (
            f" or retry it in {wait} s (identical requests are refused until then), and ask "
            "the operator to look at the workers' logs; `epdserve poison clear "
            f"{fp}` serves it again."
        )
    else:
        message += " or ask the operator to look at the workers' logs."
    return APIError(500, message, code="poison_request", headers=headers)
