"""Runs one request on a worker: pick through the policy, stream Generate, retry if unreached."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import grpc

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.policies.base import RouteRequest, RoutingPolicy
from services.router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)

# Failures after which another worker may take the request: nothing was generated yet.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
# Prefix of a worker's refusal of a request stamped with an old role epoch (it changed role).
STALE_EPOCH_PREFIX = "stale role epoch"


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
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return APIError(400, detail)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, "generation timed out on the worker")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return APIError(503, f"worker unavailable: {detail}")
    return APIError(500, f"worker error ({code.name}): {detail}")


class Orchestrator:
    """Runs requests: on a prefill/decode pair when the cluster has one (PD), else on a
    mixed worker (co-located)."""

    # A PD request is tried on one pair and retried once on another (or a mixed worker).
    PD_ATTEMPTS = 2
    # Deadline of the small control calls (Reserve, Release).
    CONTROL_TIMEOUT_S = 10.0

    def __init__(
        self, pool: WorkerPool, policy: RoutingPolicy, timeout_s: float, max_attempts: int
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts

    def pd_available(self, model: str) -> bool:
        return bool(self.pool.candidates("prefill", model)) and bool(
            self.pool.candidates("decode", model)
        )

    async def generate(
        self,
        model: str,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: pb.SamplingParams,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Stream the engine steps of one request. Closing the iterator aborts it on the worker."""
        if not self.pd_available(model):
            gen = self._generate_mixed(model, request_id, prompt_token_ids, params)
        elif params.HasField("n") and params.n > 1:
            gen = self._generate_pd_n(model, request_id, prompt_token_ids, params)
        else:
            gen = self._generate_pd(model, request_id, prompt_token_ids, params)
        try:
            async for msg in gen:
                yield msg
        finally:
            await gen.aclose()

    async def _generate_pd_n(
        self, model: str, request_id: str, prompt: Sequence[int], params: pb.SamplingParams
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """n > 1 on PD: n single-completion requests (seeded like the engine seeds its n
        children), merged back with their completion index."""
        subs = []
        for i in range(params.n):
            sub = pb.SamplingParams()
            sub.CopyFrom(params)
            sub.n = 1
            if params.HasField("seed"):
                sub.seed = params.seed + i * 1_000_003
            subs.append(self._generate_pd(model, f"{request_id}-n{i}", prompt, sub))
        async for i, msg in merge_streams(subs):
            for d in msg.outputs:
                d.index = i
            yield msg

    async def _release(self, handle: WorkerHandle, request_id: str) -> None:
        """Best effort: free a reservation now (the decode worker's deadline frees it anyway)."""
        with contextlib.suppress(Exception):
            await asyncio.shield(
                handle.stub.Release(
                    pb.ReleaseRequest(request_id=request_id), timeout=self.CONTROL_TIMEOUT_S
                )
            )

    async def _generate_pd(
        self, model: str, request_id: str, prompt: Sequence[int], params: pb.SamplingParams
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Reserve on a decode worker, prefill (KV pushed by Mooncake) on a prefill worker,
        then stream the decode. A failure before the first token is retried once on another
        pair, or on a mixed worker; then it is a clear error."""
        tried: set[str] = set()
        last_error: APIError | None = None
        for _ in range(self.PD_ATTEMPTS):
            prefills = [h for h in self.pool.candidates("prefill", model) if h.id not in tried]
            decodes = [h for h in self.pool.candidates("decode", model) if h.id not in tried]
            if not prefills or not decodes:
                break
            route = RouteRequest(request_id, len(prompt), prompt)
            p_view, d_view = self.policy.select_pair(prefills, decodes, route)
            p, d = self.pool.handles.get(p_view.id), self.pool.handles.get(d_view.id)
            if p is None or d is None:
                continue
            try:
                reservation = await d.stub.Reserve(
                    pb.ReserveRequest(
                        request_id=request_id, prompt_token_ids=list(prompt), params=params,
                        role_epoch=d.info.role_epoch,
                    ),
                    timeout=self.CONTROL_TIMEOUT_S,
                )  # fmt: skip
            except grpc.aio.AioRpcError as exc:
                last_error = self._pd_failure(exc, d, tried, d.info.role_epoch)
                continue
            d.inflight += 1
            reserved = True
            try:
                p.inflight += 1
                sent_at = time.monotonic()
                try:
                    first = await p.stub.Prefill(
                        pb.PrefillRequest(
                            request_id=request_id, prompt_token_ids=list(prompt), params=params,
                            role_epoch=p.info.role_epoch, target=reservation,
                        ),
                        timeout=self.timeout_s,
                    )  # fmt: skip
                    computed = len(prompt) - first.cached_prompt_tokens
                    p.prefill_rate.add(computed / max(time.monotonic() - sent_at, 1e-6))
                except grpc.aio.AioRpcError as exc:
                    last_error = self._pd_failure(exc, p, tried, p.info.role_epoch)
                    if "KV transfer" in (exc.details() or ""):
                        tried.add(d.id)  # either side may be at fault: use a new pair
                    continue
                finally:
                    p.inflight -= 1
                call = d.stub.Decode(
                    pb.DecodeRequest(
                        request_id=request_id, first_token_id=first.first_token_id,
                        first_logprobs=first.first_logprobs if first.HasField("first_logprobs") else None,
                        role_epoch=reservation.role_epoch,
                        cached_prompt_tokens=first.cached_prompt_tokens,
                    ),
                    timeout=self.timeout_s,
                )  # fmt: skip
                got_any = False
                try:
                    async for resp in call:
                        got_any = True
                        reserved = False
                        yield resp
                    return
                except grpc.aio.AioRpcError as exc:
                    if got_any:
                        raise api_error_from_grpc(exc) from None
                    last_error = self._pd_failure(exc, d, tried, reservation.role_epoch)
                    continue
                finally:
                    call.cancel()
            finally:
                d.inflight -= 1
                if reserved:
                    await self._release(d, request_id)
        if self.pool.candidates("mixed", model):
            log.warning("PD path failed for %s; falling back to a mixed worker", request_id)
            async for msg in self._generate_mixed(model, request_id, prompt, params):
                yield msg
            return
        if last_error is not None:
            raise last_error
        raise APIError(
            503, f"no prefill/decode pair available for model {model!r}", code="no_workers"
        )

    def _pd_failure(
        self, exc: grpc.aio.AioRpcError, handle: WorkerHandle, tried: set[str], epoch: int
    ) -> APIError:
        """Classify a failed PD call: the caller's fault is raised at once; otherwise the
        worker is excluded for this request (and taken out of routing if unreachable, mid-flip
        or past the role epoch we stamped)."""
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise api_error_from_grpc(exc) from None
        log.warning("PD call to %s failed: %s %s", handle.id, exc.code().name, exc.details())
        tried.add(handle.id)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            handle.mark_failed()
        note_refusal(exc, handle, epoch)
        return api_error_from_grpc(exc)

    async def _generate_mixed(
        self,
        model: str,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: pb.SamplingParams,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Co-located path: the whole request on one mixed worker."""
        tried: set[str] = set()
        last_error: APIError | None = None
        for _ in range(self.max_attempts):
            candidates = [h for h in self.pool.candidates("mixed", model) if h.id not in tried]
            if not candidates:
                break
            route = RouteRequest(request_id, len(prompt_token_ids), prompt_token_ids)
            handle = self.pool.handles.get(self.policy.select(candidates, route).id)
            if handle is None:  # left the cluster between listing and selection
                continue
            tried.add(handle.id)
            req = pb.GenerateRequest(
                request_id=request_id,
                prompt_token_ids=list(prompt_token_ids),
                params=params,
                role_epoch=handle.info.role_epoch,
            )
            call = handle.stub.Generate(req, timeout=self.timeout_s)
            handle.inflight += 1
            got_any = False
            try:
                async for resp in call:
                    got_any = True
                    yield resp
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _RETRYABLE and not got_any:
                    log.warning("worker %s refused %s (%s); trying another",
                                handle.id, request_id, exc.code().name)  # fmt: skip
                    note_refusal(exc, handle, req.role_epoch)
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


async def merge_streams(
    streams: Sequence[AsyncGenerator[pb.GenerateResponse, None]],
) -> AsyncGenerator[tuple[int, pb.GenerateResponse], None]:
    """Interleave several request streams as (stream index, message); cancels all on exit."""
    if len(streams) == 1:
        try:
            async for msg in streams[0]:
                yield 0, msg
        finally:
            # Close the inner generator now (not at GC): that cancels its RPC on the worker.
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, pb.GenerateResponse | None | BaseException]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[pb.GenerateResponse]) -> None:
        try:
            async for msg in it:
                await queue.put((i, msg))
            await queue.put((i, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
