"""Runs one request on a worker: pick through the policy, stream Generate, retry if unreached."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from services.common.grpc_utils import (
    FAILURE_REFUSED,
    FAILURE_REQUEST,
    FAILURE_TRANSFER,
    failure_kind,
)
from services.common.proto import worker_pb2 as pb
from services.router.encode_stage import EncodeStage, image_keys
from services.router.errors import APIError
from services.router.kv_index import KVIndexClient
from services.router.phases import RouterPhases
from services.router.poison import PoisonTracker, RequestDeaths, fingerprint
from services.router.policies.base import RouteRequest, RoutingPolicy
from services.router.streams import child_params, merge_children
from services.router.watch import WorkerLost, watched_stream, watched_unary
from services.router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)

# Failures after which another worker may take the request: nothing was generated yet.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
# Prefix of a worker's refusal of a request stamped with an old role epoch (it changed role).
STALE_EPOCH_PREFIX = "stale role epoch"
# The worker deaths of the request the current task runs (poison.py): set by
# Orchestrator.generate, counted where a worker's death is noticed.
_DEATHS: contextvars.ContextVar[RequestDeaths | None] = contextvars.ContextVar(
    "deaths", default=None
)


def worker_died(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call means its worker died, crashed its engine or hung while running
    the request (as opposed to refusing it, the request's own failure or a KV transfer)."""
    kind = failure_kind(exc)
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return kind not in (FAILURE_REFUSED, FAILURE_TRANSFER)
    return exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def note_refusal(exc: grpc.aio.AioRpcError, handle: WorkerHandle, epoch: int) -> None:
    """Take a worker out of routing after a refusal that says our view of it is stale."""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        handle.mark_failed()
    elif exc.code() == grpc.StatusCode.FAILED_PRECONDITION and (exc.details() or "").startswith(
        STALE_EPOCH_PREFIX
    ):
        handle.mark_stale_epoch(epoch)


def api_error_from_grpc(exc: grpc.aio.AioRpcError) -> APIError:
    code, detail = exc.code(), exc.details() or ""
    if failure_kind(exc) == FAILURE_REQUEST:
        return APIError(
            500, f"{detail}; the request was not retried on another worker",
            code="request_failed",
        )  # fmt: skip
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return APIError(400, detail)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, "generation timed out on the worker")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return APIError(503, f"worker unavailable: {detail}")
    return APIError(500, f"worker error ({code.name}): {detail}")


@dataclass
class Progress:
    """What the client already has of a single-completion request: enough to continue it on
    another worker (request migration) without a duplicated or missing token."""

    tokens: list[int] = field(default_factory=list)  # generated so far
    chars: int = 0  # characters of text relayed
    base: int = 0  # tokens generated before the current stream started
    finished: bool = False
    migrations: int = 0

    def resume(self) -> pb.Resume | None:
        if not self.tokens:
            return None
        return pb.Resume(output_token_ids=self.tokens, emitted_chars=self.chars)

    def begin(self) -> None:
        self.base = len(self.tokens)

    def relay(self, msg: pb.GenerateResponse) -> pb.GenerateResponse:
        """Record ``msg`` and make its counts those of the whole request."""
        for d in msg.outputs:
            self.tokens.extend(d.token_ids)
            self.chars += len(d.text)
            d.completion_tokens += self.base
        self.finished = msg.finished
        return msg

    def record(self, d: pb.CompletionDelta) -> None:
        """Record one completion's delta from a stream of several completions."""
        self.tokens.extend(d.token_ids)
        self.chars += len(d.text)
        self.finished = self.finished or bool(d.finish_reason)


class Orchestrator:
    """Runs requests: on a prefill/decode pair when the cluster has one (PD), else on a
    mixed worker (co-located). A request whose worker dies or hangs after tokens were
    streamed is continued on another worker from where it stopped (migration)."""

    # A PD request is tried on one pair and retried once on another (or a mixed worker).
    PD_ATTEMPTS = 2
    # Deadline of the small control calls (Reserve, Release).
    CONTROL_TIMEOUT_S = 10.0
    # A request finding no usable worker while some serve (one out of routing only until its
    # next load report after a failed call, or just registered) waits this long for one.
    WORKER_WAIT_S = 5.0
    WORKER_POLL_S = 0.05
    # Waits between Reserve calls while every decode worker is full (backpressure).
    FULL_BACKOFF_S = 0.05
    FULL_BACKOFF_MAX_S = 1.0

    def __init__(
        self,
        pool: WorkerPool,
        policy: RoutingPolicy,
        timeout_s: float,
        max_attempts: int,
        max_migrations: int = 3,
        stall_timeout_s: float = 60.0,
        on_migration: Callable[[str], None] | None = None,
        kv_index: KVIndexClient | None = None,
        poison: PoisonTracker | None = None,
        phases: RouterPhases | None = None,
    ) -> None:
        self.pool = pool
        self.poison = poison or PoisonTracker()
        self.phases = phases or RouterPhases()  # phase histograms and traces (phases.py)
        self.policy = policy
        self.kv_index = kv_index  # the global KV index, for cache-aware policies
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.max_migrations = max_migrations
        self.stall_timeout_s = stall_timeout_s
        self.on_migration = on_migration or (lambda reason: None)
        self.encode_stage = EncodeStage(pool, timeout_s)

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
        route = RouteRequest(request_id, len(prompt), prompt, [i.hash for i in images])
        if self.kv_index is not None and self.policy.uses_kv_index:
            await self.kv_index.annotate(route, model, candidates)
        return route

    def pd_available(self, model: str) -> bool:
        return bool(self.pool.candidates("prefill", model)) and bool(
            self.pool.candidates("decode", model)
        )

    async def _use_pd(self, model: str) -> bool:
        """Whether to run on a PD pair (else on a mixed worker). While neither is usable but
        workers that serve are known, wait for one (``_usable``)."""
        deadline = time.monotonic() + self.WORKER_WAIT_S
        while not self.pd_available(model) and not self.pool.candidates("mixed", model):
            if not self.pool.may_serve(model) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(self.WORKER_POLL_S)
        return self.pd_available(model)

    async def _usable(self, role: str, model: str, exclude: set[str]) -> list[WorkerHandle]:
        """The usable workers of ``role`` outside ``exclude``. NOTE: when there are none but
        some of them serve, wait for one (up to WORKER_WAIT_S): a worker is out of routing
        from a failed call until its next load report (a fraction of a second) and from
        registering until its first, and a request arriving then, with the only other
        worker just died, must not fail for that."""
        deadline = time.monotonic() + self.WORKER_WAIT_S
        waited = False
        while True:
            found = [h for h in self.pool.candidates(role, model) if h.id not in exclude]
            serving = [h.id for h in self.pool.serving(role, model) if h.id not in exclude]
            if found or not serving or time.monotonic() >= deadline:
                return found
            if not waited:
                log.info("no %s worker usable now; waiting for one of %s", role, serving)
                waited = True
            await asyncio.sleep(self.WORKER_POLL_S)

    async def generate(
        self,
        model: str,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: pb.SamplingParams,
        images: Sequence[pb.ImageData] = (),
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Stream the engine steps of one request. Closing the iterator aborts it on the worker.
        ``images`` (of a vision-language prompt) go through the encode stage first. A request
        that workers kept dying on is refused (poison.py)."""
        _DEATHS.set(self.poison.admit(fingerprint(model, prompt_token_ids, params, images)))
        trace = self.phases.begin(request_id, model)
        images = await trace.end_if_raises(self.encode_stage.run(model, request_id, images))
        if params.HasField("n") and params.n > 1:
            if await self._use_pd(model):
                gen = self._generate_pd_n(model, request_id, prompt_token_ids, params, images)
            else:
                gen = self._generate_mixed_n(model, request_id, prompt_token_ids, params, images)
        else:
            gen = self._generate_single(model, request_id, prompt_token_ids, params, images)
        try:
            async for msg in gen:
                yield msg
        finally:
            await gen.aclose()
            trace.end(sys.exc_info()[1])

    async def _generate_pd_n(
        self,
        model: str,
        request_id: str,
        prompt: Sequence[int],
        params: pb.SamplingParams,
        images: Sequence[pb.ImageData] = (),
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """n > 1 on PD: n single-completion requests (seeded like the engine seeds its n
        children), merged back with their completion index."""
        subs = [
            self._generate_single(
                model, f"{request_id}-n{i}", prompt, child_params(params, i), images
            )
            for i in range(params.n)
        ]
        async for msg in merge_children(subs, list(range(params.n))):
            yield msg

    async def _generate_mixed_n(
        self,
        model: str,
        request_id: str,
        prompt: Sequence[int],
        params: pb.SamplingParams,
        images: Sequence[pb.ImageData] = (),
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """n > 1 co-located: the n completions on one worker, sharing the prompt's blocks.
        When that worker dies or hangs after streaming tokens, every unfinished completion
        goes on elsewhere as a single-completion request from its own tokens (seeded like
        the engine seeds its n children, so a seeded request continues its draws) and keeps
        its index."""
        progress = [Progress() for _ in range(params.n)]
        gen = self._generate_mixed(model, request_id, prompt, params, None, images)
        try:
            async for msg in gen:
                for d in msg.outputs:
                    progress[d.index].record(d)
                yield msg
            return
        except _Migrate as m:
            if self.max_migrations < 1:
                raise APIError(503, f"worker failed mid-stream: {m.reason}") from None
            self.on_migration(m.kind)
            left = [i for i, p in enumerate(progress) if not p.finished]
            log.warning("migrating %d completions of %s (%s)", len(left), request_id, m.reason)
        finally:
            await gen.aclose()
        subs = []
        for i in left:
            progress[i].migrations = 1
            subs.append(self._generate_single(
                model, f"{request_id}-n{i}", prompt, child_params(params, i), images,
                progress[i],
            ))  # fmt: skip
        async for msg in merge_children(subs, left):
            yield msg

    async def _generate_single(
        self,
        model: str,
        request_id: str,
        prompt: Sequence[int],
        params: pb.SamplingParams,
        images: Sequence[pb.ImageData] = (),
        progress: Progress | None = None,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """One completion, on a PD pair when there is one, else on a mixed worker; when its
        worker dies or hangs mid-stream, it goes on elsewhere from the tokens it has
        (``progress``: those of a completion that already ran elsewhere)."""
        progress = progress or Progress()
        while True:
            progress.begin()
            # A migrated request gets a new id: its old worker may still hold the old one.
            rid = f"{request_id}-m{progress.migrations}" if progress.migrations else request_id
            if await self._use_pd(model):
                gen = self._generate_pd(model, rid, prompt, params, progress, images)
            else:
                gen = self._generate_mixed(model, rid, prompt, params, progress.resume(), images)
            try:
                async for msg in gen:
                    yield progress.relay(msg)
                return
            except _Migrate as m:
                if progress.migrations >= self.max_migrations:
                    raise APIError(
                        503,
                        f"worker failed mid-stream after {progress.migrations} migrations: "
                        f"{m.reason}",
                    ) from None
                progress.migrations += 1
                self.on_migration(m.kind)
                log.warning("migrating %s after %d tokens (%s)", request_id,
                            len(progress.tokens), m.reason)  # fmt: skip
            finally:
                await gen.aclose()

    async def _release(self, handle: WorkerHandle, request_id: str) -> None:
        """Best effort: free a reservation now (the decode worker's deadline frees it anyway)."""
        try:
            await asyncio.shield(
                handle.stub.Release(
                    pb.ReleaseRequest(request_id=request_id), timeout=self.CONTROL_TIMEOUT_S
                )
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled; else the worker's channel closed under the call
        except Exception:  # noqa: BLE001, S110 - best effort
            pass

    async def _generate_pd(
        self,
        model: str,
        request_id: str,
        prompt: Sequence[int],
        params: pb.SamplingParams,
        progress: Progress,
        images: Sequence[pb.ImageData] = (),
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Reserve on a decode worker, prefill (KV pushed by Mooncake) on a prefill worker,
        then stream the decode. A failure before the first token is retried once on another
        pair, or on a mixed worker; then it is a clear error. A failure after it raises
        ``_Migrate``."""
        tried: set[str] = set()
        suspects: set[str] = set()  # decode side of a failed KV transfer: others first
        last_error: APIError | None = None
        resume = progress.resume()
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(self.PD_ATTEMPTS):
            prefills = await self._usable("prefill", model, tried)
            decodes = await self._usable("decode", model, tried)
            decodes = [h for h in decodes if h.id not in suspects] or decodes
            if not prefills or not decodes:
                break
            # A retry reserves afresh under a new id: the failed attempt's reservation was
            # released, and a late write or fence of the old push must not meet the new one.
            rid = f"{request_id}-a{attempt}" if attempt else request_id
            route = await self._route(model, request_id, prompt, [*prefills, *decodes], images)
            p_view, d_view = self.policy.select_pair(prefills, decodes, route)
            p, d = self.pool.handles.get(p_view.id), self.pool.handles.get(d_view.id)
            if p is None or d is None:
                continue
            d, reservation, error = await self._reserve(model, d, tried, pb.ReserveRequest(
                request_id=rid, prompt_token_ids=list(prompt), params=params,
                resume=resume, images=image_keys(images), writer_address=p.info.address,
            ), deadline)  # fmt: skip
            if reservation is None:
                last_error = error
                continue
            d.inflight += 1
            reserved = True
            try:
                p.inflight += 1
                sent_at = time.monotonic()
                # The reservation is reclaimed at its deadline and the prefill worker stops its
                # push there (with a clear error, given 2 s to arrive): waiting longer is moot.
                prefill_timeout = self.timeout_s
                if reservation.deadline_ms:
                    prefill_timeout = min(prefill_timeout, reservation.deadline_ms / 1000 + 2.0)
                try:
                    first = await watched_unary(
                        p,
                        p.stub.Prefill(
                            pb.PrefillRequest(
                                request_id=rid, prompt_token_ids=list(prompt),
                                params=params, role_epoch=p.info.role_epoch, target=reservation,
                                resume=resume, images=images,
                            ),
                            timeout=prefill_timeout,
                        ),
                        prefill_timeout,
                    )  # fmt: skip
                    computed = len(prompt) - first.cached_prompt_tokens
                    p.prefill_rate.add(computed / max(time.monotonic() - sent_at, 1e-6))
                except WorkerLost as exc:
                    # NOTE: the decode worker stays usable: its half-written reservation is
                    # released below (its blocks quarantined past the write deadline) and
                    # the retry reserves new blocks under a new id.
                    last_error = self._lost(p, tried, exc)
                    continue
                except grpc.aio.AioRpcError as exc:
                    last_error = self._pd_failure(exc, p, tried, p.info.role_epoch)
                    if failure_kind(exc) == FAILURE_TRANSFER:
                        suspects.add(d.id)  # either side may be at fault: another if any
                    continue
                finally:
                    p.inflight -= 1
                call = d.stub.Decode(
                    pb.DecodeRequest(
                        request_id=rid, first_token_id=first.first_token_id,
                        first_logprobs=first.first_logprobs if first.HasField("first_logprobs") else None,
                        role_epoch=reservation.role_epoch,
                        cached_prompt_tokens=first.cached_prompt_tokens,
                    ),
                    timeout=self.timeout_s,
                )  # fmt: skip
                got_any = False
                try:
                    # Its first message may wait for a slot in a busy decode worker's batch.
                    first_s = d.first_message_s(0, self.stall_timeout_s)
                    async for resp in watched_stream(d, call, self.stall_timeout_s, first_s):
                        got_any = True
                        reserved = False
                        yield resp
                    return
                except WorkerLost as exc:
                    error = self._lost(d, tried, exc)
                    if got_any:
                        raise _Migrate(exc.kind, str(exc)) from None
                    last_error = error
                    continue
                except grpc.aio.AioRpcError as exc:
                    if got_any:
                        raise self._mid_stream_failure(exc, d, reservation.role_epoch) from None
                    last_error = self._pd_failure(exc, d, tried, reservation.role_epoch)
                    continue
                finally:
                    call.cancel()
            finally:
                d.inflight -= 1
                if reserved:
                    await self._release(d, rid)
        if self.pool.candidates("mixed", model):
            log.warning("PD path failed for %s; falling back to a mixed worker", request_id)
            async for msg in self._generate_mixed(
                model, request_id, prompt, params, resume, images
            ):
                yield msg
            return
        if last_error is not None:
            raise last_error
        raise APIError(
            503, f"no prefill/decode pair available for model {model!r}", code="no_workers"
        )

    async def _reserve(
        self,
        model: str,
        d: WorkerHandle,
        tried: set[str],
        request: pb.ReserveRequest,
        deadline: float,
    ) -> tuple[WorkerHandle, pb.ReserveResponse | None, APIError | None]:
        """Reserve ``request`` on ``d``: (the decode worker, its reservation, None), or
        (the worker, None, the error) after a failure. A worker refusing for lack of room
        (RESOURCE_EXHAUSTED) is backpressure, not a failure: the other decode workers are
        asked, and when all are full the request waits (backoff) until one has room, up to
        ``deadline``."""
        full: set[str] = set()
        backoff = self.FULL_BACKOFF_S
        while True:
            request.role_epoch = d.info.role_epoch
            try:
                reservation = await watched_unary(
                    d, d.stub.Reserve(request, timeout=self.CONTROL_TIMEOUT_S),
                    self.CONTROL_TIMEOUT_S,
                )  # fmt: skip
                return d, reservation, None
            except WorkerLost as exc:
                return d, None, self._lost(d, tried, exc)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    return d, None, self._pd_failure(exc, d, tried, request.role_epoch)
                log.info("decode worker %s is full: %s", d.id, exc.details())
            full.add(d.id)
            decodes = [h for h in self.pool.candidates("decode", model) if h.id not in tried]
            if not decodes:
                return d, None, APIError(503, "no decode worker left", code="no_workers")
            with_room = [h for h in decodes if h.id not in full]
            if not with_room:  # all full: wait for blocks to free up, then ask again
                await asyncio.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                backoff = min(2 * backoff, self.FULL_BACKOFF_MAX_S)
                full.clear()
                with_room = decodes
            d = next((h for h in with_room if h.id == d.id), with_room[0])

    def _pd_failure(
        self, exc: grpc.aio.AioRpcError, handle: WorkerHandle, tried: set[str], epoch: int
    ) -> APIError:
        """Classify a failed PD call: the caller's fault is raised at once; otherwise the
        worker is excluded for this request (and taken out of routing if unreachable, mid-flip
        or past the role epoch we stamped)."""
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT or failure_kind(exc) == FAILURE_REQUEST:
            raise api_error_from_grpc(exc) from None
        log.warning("PD call to %s failed: %s %s", handle.id, exc.code().name, exc.details())
        if worker_died(exc):
            self._note_death(handle)
        tried.add(handle.id)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            handle.mark_failed()
        note_refusal(exc, handle, epoch)
        return api_error_from_grpc(exc)

    def _note_death(self, handle: WorkerHandle) -> None:
        """The current request was running on ``handle`` when it died or hung: raise the
        poison error if that makes it poison (it is not sent to another worker)."""
        deaths = _DEATHS.get()
        if deaths is not None:
            self.poison.note_death(deaths, handle.id)

    def _lost(self, handle: WorkerHandle, tried: set[str], exc: WorkerLost) -> APIError:
        log.warning("worker %s stopped answering: %s", handle.id, exc)
        handle.mark_failed()
        self._note_death(handle)
        tried.add(handle.id)
        return APIError(503, f"worker unavailable: {exc}")

    def _mid_stream_failure(
        self, exc: grpc.aio.AioRpcError, handle: WorkerHandle, epoch: int
    ) -> Exception:
        """After tokens were streamed: a dead worker (or one that gave the request up: engine
        failure, role change) means migration; the request's own fault or its deadline is
        the client's error."""
        if (
            exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED)
            or failure_kind(exc) == FAILURE_REQUEST
        ):
            return api_error_from_grpc(exc)
        if worker_died(exc):
            self._note_death(handle)
        note_refusal(exc, handle, epoch)
        return _Migrate("died", f"{handle.id}: {exc.code().name} {exc.details()}")

    async def _generate_mixed(
        self,
        model: str,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: pb.SamplingParams,
        resume: pb.Resume | None,
        images: Sequence[pb.ImageData] = (),
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Co-located path: the whole request on one mixed worker (continuing ``resume``'s
        tokens); a death or hang after the first token raises ``_Migrate``."""
        tried: set[str] = set()
        last_error: APIError | None = None
        for _ in range(self.max_attempts):
            candidates = await self._usable("mixed", model, tried)
            if not candidates:
                break
            route = await self._route(model, request_id, prompt_token_ids, candidates, images)
            handle = self.pool.handles.get(self.policy.select(candidates, route).id)
            if handle is None:  # left the cluster between listing and selection
                continue
            tried.add(handle.id)
            req = pb.GenerateRequest(
                request_id=request_id,
                prompt_token_ids=list(prompt_token_ids),
                params=params,
                role_epoch=handle.info.role_epoch,
                resume=resume,
                images=images,
            )
            call = handle.stub.Generate(req, timeout=self.timeout_s)
            handle.inflight += 1
            got_any = False
            todo = len(prompt_token_ids) + (len(resume.output_token_ids) if resume else 0)
            first_s = handle.first_message_s(todo, self.stall_timeout_s)
            sent_at = time.monotonic()
            try:
                async for resp in watched_stream(handle, call, self.stall_timeout_s, first_s):
                    if not got_any:
                        computed = resp.prompt_tokens - resp.cached_prompt_tokens
                        handle.prefill_rate.add(computed / max(time.monotonic() - sent_at, 1e-6))
                    got_any = True
                    yield resp
                return
            except WorkerLost as exc:
                error = self._lost(handle, tried, exc)
                if got_any:
                    raise _Migrate(exc.kind, str(exc)) from None
                last_error = error
                continue
            except grpc.aio.AioRpcError as exc:
                if got_any:
                    raise self._mid_stream_failure(exc, handle, req.role_epoch) from None
                if exc.code() in _RETRYABLE and not got_any:
                    log.warning("worker %s refused %s (%s); trying another",
                                handle.id, request_id, exc.code().name)  # fmt: skip
                    note_refusal(exc, handle, req.role_epoch)
                    if worker_died(exc):
                        self._note_death(handle)
                    last_error = api_error_from_grpc(exc)
                    continue
                raise api_error_from_grpc(exc) from None
            finally:
                handle.inflight -= 1
                # No-op when the call completed; otherwise (client gone, consumer closed us)
                # it cancels the RPC, and the worker aborts the request and frees its KV.
                call.cancel()
        if last_error is not None and last_error.status != 503:
            raise last_error
        raise APIError(503, f"no worker available for model {model!r}", code="no_workers")


class _Migrate(Exception):
    """The request's worker died (``kind`` "died") or hung ("hung") after streaming tokens."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
