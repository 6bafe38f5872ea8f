"""Prefill/decode disaggregation: one attempt of a request as reserve -> prefill -> decode."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass

from services.common.grpc_utils import FAILURE_TRANSFER
from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.routing.encode_stage import image_keys
from services.router.routing.policies.base import RouteRequest, RoutingPolicy
from services.router.routing.retry import AttemptFailed, Attempts, WorkerBusy
from services.router.routing.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)


def tp_size(handle: WorkerHandle) -> int:
    """A worker's tensor-parallel size (1 for workers that do not advertise it)."""
    return int(handle.info.capacity.get("tensor_parallel_size", 1) or 1)


def pair_of_one_size(
    policy: RoutingPolicy,
    prefills: Sequence[WorkerHandle],
    decodes: Sequence[WorkerHandle],
    route: RouteRequest,
) -> tuple[WorkerHandle, WorkerHandle]:
    """The policy's (prefill, decode) pair, both of one tensor-parallel size where it can:
    rank i writes into rank i, and a decode worker of another size refuses the Reserve.
    Prefill workers with no decode worker of their size are passed over while others have
    one; a decode worker of another size is replaced by the policy's pick among p's size."""
    sizes = {tp_size(h) for h in decodes}
    prefills = [h for h in prefills if tp_size(h) in sizes] or prefills
    p, d = policy.select_pair(prefills, decodes, route)
    same = [h for h in decodes if tp_size(h) == tp_size(p)]
    if tp_size(d) != tp_size(p) and same:
        _, d = policy.select_pair([p], same, route)
    return p, d


@dataclass
class PDRequest:
    """What every attempt of one PD request sends."""

    model: str
    prompt: Sequence[int]
    params: pb.SamplingParams
    resume: pb.Resume | None  # tokens already streamed (a migrated request), or None
    images: Sequence[pb.ImageData]
    deadline: float  # monotonic; past it a full decode worker is an error, not backpressure


@dataclass
class Reservation:
    """KV blocks reserved for one attempt on a decode worker, for the prefill to write."""

    handle: WorkerHandle  # the decode worker
    request_id: str  # the attempt's id
    reply: pb.ReserveResponse
    claimed: bool = False  # the decode worker streamed the request: the blocks are its own


class PDSteps:
    """The steps of one attempt on a (prefill, decode) pair. The reservation is held in a
    context: whatever ends the attempt before the decode worker claims it releases it."""

    # Deadline of the small control calls (Reserve, Release).
    CONTROL_TIMEOUT_S = 10.0
    # Waits between Reserve calls while every decode worker is full (backpressure).
    FULL_BACKOFF_S = 0.05
    FULL_BACKOFF_MAX_S = 1.0

    def __init__(self, pool: WorkerPool, timeout_s: float, stall_timeout_s: float) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s

    async def run(
        self,
        p: WorkerHandle,
        d: WorkerHandle,
        rid: str,
        request: PDRequest,
        attempts: Attempts,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Reserve blocks on ``d``, prefill on ``p`` (which pushes the KV into them with
        Mooncake), stream the decode from ``d``. ``AttemptFailed`` before the first token,
        ``Migrate`` after it (see retry.Attempts)."""
        async with self.reserved(d, p, rid, request, attempts) as held:
            first = await self.prefill(p, held, request, attempts)
            async with aclosing(self.decode(held, first, attempts)) as stream:
                async for resp in stream:
                    yield resp

    @asynccontextmanager
    async def reserved(
        self,
        d: WorkerHandle,
        p: WorkerHandle,
        rid: str,
        request: PDRequest,
        attempts: Attempts,
    ) -> AsyncIterator[Reservation]:
        """Blocks reserved for ``rid`` on ``d`` (or, while it is full, on another decode
        worker) for ``p`` to write; released on exit unless the decode worker claimed them."""
        ask = pb.ReserveRequest(
            request_id=rid, prompt_token_ids=list(request.prompt), params=request.params,
            resume=request.resume, images=image_keys(request.images),
            writer_address=p.info.address, lora=self.pool.lora_of(request.model),
            writer_tensor_parallel_size=tp_size(p),
        )  # fmt: skip
        held = await self._reserve(d, ask, request, attempts)
        held.handle.inflight += 1
        try:
            yield held
        finally:
            held.handle.end_request(0)  # the prompt's KV arrives; the decode worker computes none
            if not held.claimed:
                await self._release(held)

    async def prefill(
        self, p: WorkerHandle, held: Reservation, request: PDRequest, attempts: Attempts
    ) -> pb.PrefillResponse:
        """Prefill on ``p``, which pushes the KV into ``held``; its first token. NOTE: when
        ``p`` fails, the decode worker stays usable: its half-written reservation is released
        (its blocks quarantined past the write deadline) and the retry reserves new blocks
        under a new id. A failed KV transfer may be either side's fault: the next attempt
        reserves on another decode worker if there is one."""
        # The reservation is reclaimed at its deadline and the prefill worker stops its push
        # there (with a clear error, given 2 s to arrive): waiting longer is moot.
        timeout = self.timeout_s
        if held.reply.deadline_ms:
            timeout = min(timeout, held.reply.deadline_ms / 1000 + 2.0)
        p.inflight += 1
        sent_at = time.monotonic()
        try:
            first = await attempts.unary(
                p,
                p.stub.Prefill(
                    pb.PrefillRequest(
                        request_id=held.request_id, prompt_token_ids=list(request.prompt),
                        params=request.params, role_epoch=p.info.role_epoch, target=held.reply,
                        resume=request.resume, images=request.images,
                        lora=self.pool.lora_of(request.model),
                    ),
                    timeout=timeout,
                ),
                timeout,
                p.info.role_epoch,
            )  # fmt: skip
        except AttemptFailed as failure:
            if failure.kind == FAILURE_TRANSFER:
                attempts.suspects.add(held.handle.id)
            raise
        finally:
            p.end_request(len(request.prompt))
        computed = len(request.prompt) - first.cached_prompt_tokens
        p.prefill_rate.add(computed / max(time.monotonic() - sent_at, 1e-6))
        return first

    async def decode(
        self, held: Reservation, first: pb.PrefillResponse, attempts: Attempts
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Stream the decode from ``held``'s worker, which claims the reservation with its
        first message."""
        d = held.handle
        call = d.stub.Decode(
            pb.DecodeRequest(
                request_id=held.request_id, first_token_id=first.first_token_id,
                first_logprobs=first.first_logprobs if first.HasField("first_logprobs") else None,
                role_epoch=held.reply.role_epoch,
                cached_prompt_tokens=first.cached_prompt_tokens,
                draft_states=first.draft_states if first.HasField("draft_states") else None,
            ),
            timeout=self.timeout_s,
        )  # fmt: skip

        def claim(_: pb.GenerateResponse) -> None:
            held.claimed = True

        finished = False
        try:
            # Its first message may wait for a slot in a busy decode worker's batch.
            first_s = d.first_message_s(0, self.stall_timeout_s)
            async for resp in attempts.relay(
                d, call, self.stall_timeout_s, first_s, held.reply.role_epoch, claim
            ):
                finished = resp.finished
                yield resp
        finally:
            if not finished:  # a finished request's call ends on its own (Attempts.relay)
                call.cancel()

    async def _reserve(
        self, d: WorkerHandle, ask: pb.ReserveRequest, request: PDRequest, attempts: Attempts
    ) -> Reservation:
        """Reserve ``ask`` on ``d``. A worker refusing for lack of room is backpressure, not
        a failure: the other decode workers are asked, and when all are full the request
        waits (backoff) until one has room, up to the request's deadline."""
        full: set[str] = set()
        backoff = self.FULL_BACKOFF_S
        while True:
            ask.role_epoch = d.info.role_epoch
            # NOTE: not a small control call: the decode worker compiles the request's
            # structured-output grammar first (engine.prepare), and the first one builds
            # llguidance's tokenizer: 1.5 s on a quiet 2-core CPU, 13.5 s at load 16. With
            # CONTROL_TIMEOUT_S the first schema request on a fresh PD cluster got 504
            # (test_structured_outputs: 2 of 4 runs, at load 24 and 27). It gets what a mixed
            # worker's first message gets (stall_timeout_s); a dead or hung decode worker is
            # still caught sooner by its silent load stream (watch.py).
            limit = max(self.CONTROL_TIMEOUT_S, self.stall_timeout_s)
            try:
                reply = await attempts.unary(
                    d, d.stub.Reserve(ask, timeout=limit), limit, ask.role_epoch,
                    busy_until=request.deadline,
                )  # fmt: skip
                return Reservation(d, ask.request_id, reply)
            except WorkerBusy as busy:
                log.info("decode worker %s is full: %s", d.id, busy)
            full.add(d.id)
            decodes = [
                h
                for h in self.pool.candidates("decode", request.model)
                if h.process not in attempts.tried
            ]
            if not decodes:
                attempts.last_error = APIError(503, "no decode worker left", code="no_workers")
                raise AttemptFailed()
            with_room = [h for h in decodes if h.id not in full]
            if not with_room:  # all full: wait for blocks to free up, then ask again
                await asyncio.sleep(max(0.0, min(backoff, request.deadline - time.monotonic())))
                backoff = min(2 * backoff, self.FULL_BACKOFF_MAX_S)
                full.clear()
                with_room = decodes
            d = next((h for h in with_room if h.id == d.id), with_room[0])

    async def _release(self, held: Reservation) -> None:
        """Best effort: free a reservation now (the decode worker's deadline frees it anyway)."""
        try:
            await asyncio.shield(
                held.handle.stub.Release(
                    pb.ReleaseRequest(request_id=held.request_id),
                    timeout=self.CONTROL_TIMEOUT_S,
                )
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled; else the worker's channel closed under the call
        except Exception:  # noqa: BLE001, S110 - best effort
            pass
