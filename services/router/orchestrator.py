"""Runs one request on a worker: pick through the policy, stream Generate, retry if unreached."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import grpc

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.policies.base import RouteRequest, RoutingPolicy
from services.router.workers import WorkerPool

log = logging.getLogger(__name__)

# Failures after which another worker may take the request: nothing was generated yet.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)


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
    """Co-located (mixed-role) request path. The PD path will sit beside it."""

    def __init__(
        self, pool: WorkerPool, policy: RoutingPolicy, timeout_s: float, max_attempts: int
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts

    async def generate(
        self,
        model: str,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: pb.SamplingParams,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Stream the engine steps of one request. Closing the iterator aborts it on the worker."""
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
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        handle.mark_failed()
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
