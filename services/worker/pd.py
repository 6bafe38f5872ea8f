"""The worker's PD-disaggregation RPCs: the decode side's ``Reserve`` and ``Release``, the
prefill side's ``Prefill`` and ``FenceKVPush`` (``Decode`` streams, so it stays in server.py
beside ``Generate``)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import grpc

from services.common.mooncake_agent import TransferError
from services.common.proto import worker_pb2 as pb
from services.decode.fence import FENCE_WAIT_S
from services.engine.service_tiers import FLEX
from services.worker.errors import PREFILL, RESERVE, Classify, Code, call_status
from services.worker.metrics import WorkerMetrics
from services.worker.state import WorkerState

if TYPE_CHECKING:
    from services.decode.role import DecodeRole
    from services.prefill.role import PrefillRole

MAX_OFFLINE_RESERVED = 1024  # past this many, the ids of reservations gone are dropped


class PDRPCs:
    """``Reserve``, ``Release``, ``FenceKVPush`` and ``Prefill`` of the WorkerService (mixed
    into its servicer, whose helpers they use)."""

    state: WorkerState
    metrics: WorkerMetrics
    prefill: PrefillRole | None
    decode: DecodeRole | None
    offline_reserved: set[str]  # flex requests reserved here: Decode's latencies are not online
    observe_ttft: Callable[[float, bool], None]
    _admit: Callable[..., Awaitable[None]]
    _pd: Callable[..., Awaitable[Any]]
    _inflight: Callable[..., AbstractAsyncContextManager[None]]
    _classify: Callable[[str], Classify]
    _prompt: Callable[
        [Sequence[int], Sequence[pb.ImageData], grpc.aio.ServicerContext],
        Awaitable[list[int] | dict[str, Any]],
    ]

    async def Reserve(  # noqa: N802
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveResponse:
        await self._admit(context, ("decode",), request.role_epoch)
        decode = await self._pd(self.decode, context)
        async with call_status(context, RESERVE):
            resp = await decode.reserve(request)
        if request.params.service_tier == FLEX:
            # NOTE: a reservation that expires unclaimed leaves its id; drop those now and then.
            if len(self.offline_reserved) > MAX_OFFLINE_RESERVED:
                self.offline_reserved &= set(decode.held())
            self.offline_reserved.add(request.request_id)
        resp.role_epoch = self.state.role_epoch
        return resp

    async def Release(  # noqa: N802
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        self.offline_reserved.discard(request.request_id)
        found = self.decode is not None and await self.decode.release(request.request_id)
        return pb.ReleaseResponse(found=found)

    async def FenceKVPush(  # noqa: N802
        self, request: pb.FenceKVPushRequest, context: grpc.aio.ServicerContext
    ) -> pb.FenceKVPushResponse:
        """No write of the request's KV push lands after this returns (any role: a push
        started before a role change still drains). UNAVAILABLE: not yet, ask again."""
        if self.prefill is not None and not await self.prefill.fence(request, FENCE_WAIT_S):
            await context.abort(Code.UNAVAILABLE, "KV push still draining")
        return pb.FenceKVPushResponse()

    async def Prefill(  # noqa: N802
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        await self._admit(context, ("prefill",), request.role_epoch)
        prefill = await self._pd(self.prefill, context)
        st = self.state
        rid = request.request_id
        async with self._inflight(rid, context), call_status(context, PREFILL, self._classify(rid)):
            arrived = time.monotonic()
            prompt = await self._prompt(request.prompt_token_ids, request.images, context)
            try:
                resp = await prefill.run(request, prompt)
            except TransferError:
                self.metrics.kv_transfer.record_failure()
                raise
            if rid in st.evicted:
                await context.abort(Code.UNAVAILABLE, st.evicted[rid])
            elapsed = time.monotonic() - arrived
            self.observe_ttft(elapsed * 1000.0, request.params.service_tier != FLEX)
            self.metrics.observe_prefill(elapsed, len(request.prompt_token_ids))
            self.metrics.kv_transfer.record(resp.kv_bytes, resp.kv_seconds)
            return resp
        raise AssertionError("unreachable")  # context.abort raises
