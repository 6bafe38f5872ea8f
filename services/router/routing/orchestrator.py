"""Runs one request on workers: picks them through the policy, on a PD pair or a mixed worker."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from functools import partial

from services.common.proto import worker_pb2 as pb
from services.router.phases import RouterPhases
from services.router.routing.encode_stage import EncodeStage
from services.router.routing.kv_index import KVIndexClient
from services.router.routing.lora_affinity import DEFAULT_SLACK
from services.router.routing.migration import Migration, Progress
from services.router.routing.pd import PDRequest, PDSteps
from services.router.routing.poison import Placements, PoisonTracker, fingerprint
from services.router.routing.policies.base import RoutingPolicy
from services.router.routing.retry import RETRYABLE, AttemptFailed, Attempts
from services.router.routing.streams import child_params, merge_children
from services.router.routing.unavailable import no_worker_error
from services.router.routing.worker_choice import WorkerChoice
from services.router.routing.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)


def measure_prefill(handle: WorkerHandle, sent_at: float) -> Callable[[pb.GenerateResponse], None]:
    """Records ``handle``'s prompt tokens/s from the first message of a call sent at ``sent_at``."""

    def first(resp: pb.GenerateResponse) -> None:
        computed = resp.prompt_tokens - resp.cached_prompt_tokens
        handle.prefill_rate.add(computed / max(time.monotonic() - sent_at, 1e-6))

    return first


class Orchestrator(WorkerChoice):
    """Runs requests: on a prefill/decode pair when the cluster has one (PD), else on a
    mixed worker (co-located). A request whose worker dies or hangs after tokens were
    streamed is continued on another worker from where it stopped (migration)."""

    # A PD request is tried on one pair and retried once on another (or a mixed worker).
    PD_ATTEMPTS = 2

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
        restart_wait_s: float = 0.0,
        lora_slack: float = DEFAULT_SLACK,
    ) -> None:
        self.pool = pool
        self.restart_wait_s = restart_wait_s  # worker_choice.py
        self.lora_slack = lora_slack  # worker_choice.py
        self.poison = poison or PoisonTracker()
        self.phases = phases or RouterPhases()  # phase histograms and traces (phases.py)
        self.policy = policy
        self.kv_index = kv_index  # the global KV index, for cache-aware policies
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts  # mixed workers tried for one request
        self.stall_timeout_s = stall_timeout_s
        self.migration = Migration(max_migrations, on_migration or (lambda reason: None))
        self.encode_stage = EncodeStage(pool, timeout_s, self.poison)
        self.pd = PDSteps(pool, timeout_s, stall_timeout_s)
        # Whether a worker has headroom for offline (flex) work (offline.py); None: any has.
        self.has_room: Callable[[WorkerHandle], bool] | None = None

    async def generate(
        self,
        model: str,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: pb.SamplingParams,
        images: Sequence[pb.ImageData] = (),
        placements: Placements | None = None,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Stream the engine steps of one request. Closing the iterator aborts it on the worker.
        ``images`` (of a vision-language prompt) go through the encode stage first. A request
        that workers kept dying on is refused (poison.py); ``placements``: those of the
        other prompts of the client's request (poison.py: shared turns after a death)."""
        fp = fingerprint(model, prompt_token_ids, params, images)
        deaths = self.poison.track(fp, placements)
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
            while True:
                # NOTE: each step may run in another task than the last (the gateway awaits a
                # stream's first step in a task of its own): the request's context goes along.
                self.poison.resume(deaths)
                trace.resume()
                try:
                    msg = await anext(gen)
                except StopAsyncIteration:
                    break
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

    def _generate_mixed_n(
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
        the engine seeds its n children, so a seeded request continues its draws)."""

        def child(i: int, progress: Progress) -> AsyncGenerator[pb.GenerateResponse, None]:
            return self._generate_single(
                model, f"{request_id}-n{i}", prompt, child_params(params, i), images, progress
            )

        together = self._generate_mixed(model, request_id, prompt, params, None, images)
        return self.migration.completions(request_id, params.n, together, child)

    def _generate_single(
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
        start = partial(self._start, model, prompt, params, images)
        return self.migration.single(request_id, progress or Progress(), start)

    async def _start(
        self,
        model: str,
        prompt: Sequence[int],
        params: pb.SamplingParams,
        images: Sequence[pb.ImageData],
        rid: str,
        progress: Progress,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """One stream of a completion, as ``rid``, from ``progress``: on a PD pair when there
        is one, else on a mixed worker."""
        if await self._use_pd(model):
            return self._generate_pd(model, rid, prompt, params, progress, images)
        return self._generate_mixed(model, rid, prompt, params, progress.resume(), images)

    async def _generate_pd(
        self,
        model: str,
        request_id: str,
        prompt: Sequence[int],
        params: pb.SamplingParams,
        progress: Progress,
        images: Sequence[pb.ImageData] = (),
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Reserve on a decode worker, prefill on a prefill worker, stream the decode (pd.py).
        A failure before the first token is retried once on another pair, or on a mixed
        worker; then it is a clear error. A failure after it raises ``Migrate``."""
        # Any worker failure is retried: either side of a pair may be at fault.
        attempts = Attempts(self.poison)
        deadline = time.monotonic() + self.timeout_s
        request = PDRequest(model, prompt, params, progress.resume(), images, deadline)
        for attempt in range(self.PD_ATTEMPTS):
            # After a death of the request, one attempt at a time (poison.py).
            async with self.poison.turn() as turn:
                # A retry reserves afresh under a new id: the failed attempt's reservation
                # was released, and a late write or fence of the old push must not meet the
                # new one.
                rid = f"{request_id}-a{attempt}" if attempt else request_id
                try:
                    pair = await self._choose_pair(request_id, request, attempts)
                    if pair is None:
                        break
                    async with aclosing(self.pd.run(*pair, rid, request, attempts)) as steps:
                        async for msg in steps:
                            turn.end()  # placed and answering: the next may be placed
                            yield msg
                    return
                except AttemptFailed:
                    continue
        if self.pool.candidates("mixed", model):
            log.warning("PD path failed for %s; falling back to a mixed worker", request_id)
            mixed = self._generate_mixed(model, request_id, prompt, params, request.resume, images)
            async with aclosing(mixed):
                async for msg in mixed:
                    yield msg
            return
        if attempts.last_error is not None:
            raise attempts.last_error
        raise no_worker_error(
            self.pool, model, f"no prefill/decode pair available for model {model!r}",
            self.restart_wait_s,
        )  # fmt: skip

    async def run_pooling(self, model: str, request: pb.PoolRequest) -> pb.PoolResponse:
        """A pooling request (embeddings, rerank, score) on a mixed worker, retried on
        another one (``max_attempts``) when a worker is unavailable before it answers."""
        attempts = Attempts(self.poison, RETRYABLE)
        tokens = sum(len(i.ids) for i in request.inputs)
        first = request.inputs[0].ids
        for _ in range(self.max_attempts):
            try:
                handle = await self._choose(model, request.request_id, first, (), attempts)
            except AttemptFailed:
                continue
            if handle is None:
                break
            attempts.tried.add(handle.process)
            request.role_epoch = handle.info.role_epoch
            handle.inflight += 1
            try:
                call = handle.stub.Pool(request, timeout=self.timeout_s)
                return await attempts.unary(handle, call, self.timeout_s, request.role_epoch)
            except AttemptFailed:
                continue
            finally:
                handle.end_request(tokens)
        if attempts.last_error is not None and attempts.last_error.status != 503:
            raise attempts.last_error
        raise no_worker_error(self.pool, model, f"no worker available for model {model!r}",
                              self.restart_wait_s)  # fmt: skip

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
        tokens); a death or hang after the first token raises ``Migrate``."""
        attempts = Attempts(self.poison, RETRYABLE)
        for _ in range(self.max_attempts):
            # After a death of the request, one attempt at a time (poison.py).
            async with self.poison.turn() as turn:
                try:
                    handle = await self._choose(
                        model, request_id, prompt_token_ids, images, attempts, params.service_tier
                    )
                except AttemptFailed:
                    continue
                if handle is None:
                    break
                attempts.tried.add(handle.process)
                req = pb.GenerateRequest(
                    request_id=request_id,
                    prompt_token_ids=list(prompt_token_ids),
                    params=params,
                    role_epoch=handle.info.role_epoch,
                    resume=resume,
                    images=images,
                    lora=self.pool.lora_of(model),
                )
                call = handle.stub.Generate(req, timeout=self.timeout_s)
                handle.inflight += 1
                todo = len(prompt_token_ids) + (len(resume.output_token_ids) if resume else 0)
                first_s = handle.first_message_s(todo, self.stall_timeout_s)
                measure = measure_prefill(handle, time.monotonic())
                finished = False
                try:
                    async for resp in attempts.relay(
                        handle, call, self.stall_timeout_s, first_s, req.role_epoch, measure
                    ):
                        turn.end()  # placed and answering: the next may be placed
                        finished = resp.finished
                        yield resp
                    return
                except AttemptFailed:
                    continue
                finally:
                    handle.end_request(todo)
                    # Unless the request finished (its call then ends on its own:
                    # Attempts.relay), the client left or the consumer closed us: cancel the
                    # RPC, and the worker aborts the request and frees its KV.
                    if not finished:
                        call.cancel()
        if attempts.last_error is not None and attempts.last_error.status != 503:
            raise attempts.last_error
        raise no_worker_error(self.pool, model, f"no worker available for model {model!r}",
                              self.restart_wait_s)  # fmt: skip
