"""The WorkerService servicer: runs requests on the engine, reports load, holds the role."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from services.common import delivery_log
from services.common.convert import delta_to_proto, params_from_proto, resume_from_proto
from services.common.grpc_utils import FAILURE_REFUSED, failure_metadata, role_from_pb, role_to_pb
from services.common.latency import LatencyWindow
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.common.role import Role
from services.engine.outputs import LOST_IMAGES
from services.engine.service_tiers import FLEX
from services.worker.errors import (
    ENCODE,
    IMAGES,
    PARAMS,
    SET_ROLE,
    STREAM,
    Classify,
    Code,
    call_status,
)
from services.worker.experts import ExpertRPCs
from services.worker.load import LoadRPCs
from services.worker.lora import LoRARPCs
from services.worker.metrics import WorkerMetrics
from services.worker.model_load import LoadModelRPCs, WorkerModelLoad
from services.worker.mux import MuxRPCs
from services.worker.pd import PDRPCs
from services.worker.pooling import PoolingCalls, check_role
from services.worker.role_controller import RoleController
from services.worker.sleep import SleepRPCs, WorkerSleep
from services.worker.state import WorkerState

if TYPE_CHECKING:
    from services.decode.role import DecodeRole
    from services.encoder.role import EncodeRole
    from services.prefill.role import PrefillRole
    from services.worker.image_inputs import ImageLoader

R = TypeVar("R", bound=Role)


class WorkerServicer(
    PoolingCalls,
    LoRARPCs,
    LoadRPCs,
    PDRPCs,
    ExpertRPCs,
    SleepRPCs,
    LoadModelRPCs,
    MuxRPCs,
    pb_grpc.WorkerServiceServicer,
):
    """gRPC face of one engine. ``engine`` is an AsyncLLMEngine (or a test double)."""

    def __init__(
        self,
        engine: Any,
        state: WorkerState,
        load_interval_ms: int = 200,
        prefill: PrefillRole | None = None,
        decode: DecodeRole | None = None,
        drain_timeout_s: float = 60.0,
        supports_pd: bool = True,
    ) -> None:
        self.engine = engine
        # Role logic of PD disaggregation; None when KV transfer is disabled.
        self.prefill = prefill
        self.decode = decode
        self.state = state
        self.metrics = WorkerMetrics(engine, state)  # its registry; main.py serves it
        self.load_interval_ms = load_interval_ms
        self.ttft_ms = LatencyWindow()
        self.tpot_ms = LatencyWindow()
        self.online_ttft_ms, self.online_tpot_ms = LatencyWindow(), LatencyWindow()
        self.offline_reserved: set[str] = set()  # flex requests reserved here (pd.py)
        self.closing = asyncio.Event()  # ends StreamLoad streams at shutdown
        # Vision-language models only (set by main.setup_images): a request's images as engine
        # inputs, and the encode role (which needs Mooncake too).
        self.images: ImageLoader | None = None
        self.encoder: EncodeRole | None = None
        self.roles = RoleController(
            state, drain_timeout_s, held=self.held, evict=self.evict,
            supports=lambda role: check_role(engine, role, role == "mixed" or supports_pd)
            and (role != "encode" or self.encoder is not None),
        )  # fmt: skip
        self.sleeper = WorkerSleep(state, engine, self.roles)
        self.loader = WorkerModelLoad(state, self.roles, getattr(engine, "model_name", ""))

    def parts(self) -> list[Role]:
        """The roles' machinery this worker has, in the order the worker stops it."""
        return [r for r in (self.decode, self.prefill, self.encoder) if r is not None]

    def held(self) -> int:
        """Work this worker holds: running requests plus what its roles hold (reservations)."""
        return len(self.state.inflight) + sum(len(r.held()) for r in self.parts())

    async def evict(self, message: str) -> None:
        """Abort everything held (role change past its drain timeout), reporting ``message``."""
        for rid in list(self.state.inflight):
            self.state.evicted[rid] = message
            with contextlib.suppress(Exception):
                await self.engine.abort(rid)
        for role in self.parts():
            await role.release_held()

    @contextlib.asynccontextmanager
    async def _inflight(
        self, rid: str, context: grpc.aio.ServicerContext, unique: bool = True
    ) -> AsyncIterator[None]:
        """Count ``rid`` in flight while the block runs (the drain and role changes wait for
        it); ``unique``: refuse it (ALREADY_EXISTS) when it is in flight already."""
        st = self.state
        if unique and rid in st.inflight:
            await context.abort(Code.ALREADY_EXISTS, f"request {rid} already running")
        st.inflight.add(rid)
        st.idle.clear()
        try:
            yield
        finally:
            st.inflight.discard(rid)
            st.evicted.pop(rid, None)
            if not st.inflight:
                st.idle.set()

    def _classify(self, rid: str) -> Classify:
        """How a call running ``rid`` classifies the failures its rules do not name."""
        return Classify(rid, self.state.instance_id, self.metrics.request_failures)

    async def _admit(
        self,
        context: grpc.aio.ServicerContext,
        roles: tuple[str, ...],
        epoch: int,
        held: bool = False,
    ) -> None:
        """Refuse (kind "refused") a call this worker must not take now (``WorkerState.refusal``)."""
        refusal = self.state.refusal(roles, epoch, held)
        if refusal is not None:
            await context.abort(*refusal, failure_metadata(FAILURE_REFUSED))

    @staticmethod
    async def _pd(role: R | None, context: grpc.aio.ServicerContext) -> R:
        """A PD role's machinery, or FAILED_PRECONDITION when KV transfer is disabled."""
        if role is None:
            await context.abort(Code.FAILED_PRECONDITION, "KV transfer is disabled")
        assert role is not None  # context.abort raised otherwise
        return role

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        await self._admit(context, ("mixed",), request.role_epoch)
        async with call_status(context, PARAMS):
            params = params_from_proto(request.params)
        rid = request.request_id or uuid.uuid4().hex
        prompt = await self._prompt(request.prompt_token_ids, request.images, context)
        resume = resume_from_proto(request)
        outputs = self.engine.generate(rid, prompt, params, resume=resume, lora=request.lora)
        online = request.params.service_tier != FLEX
        async for msg in self._stream(rid, outputs, context, online=online):
            yield msg

    async def Decode(  # noqa: N802
        self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id
        held = self.decode is not None and rid in self.decode.held()
        await self._admit(context, ("decode",), request.role_epoch, held=held)
        decode = await self._pd(self.decode, context)
        if rid in self.state.inflight:
            # Before the claim: a claimed reservation is freed only by running its stream.
            await context.abort(Code.ALREADY_EXISTS, f"request {rid} already running")
        try:
            outputs = decode.decode(request)
        except KeyError:
            await context.abort(Code.NOT_FOUND, f"no reservation for {rid} (expired or never made)")
        except ValueError as exc:
            await context.abort(Code.INVALID_ARGUMENT, str(exc))
        online = rid not in self.offline_reserved
        self.offline_reserved.discard(rid)
        cached = request.cached_prompt_tokens
        async for msg in self._stream(rid, outputs, context, cached, online=online):
            yield msg

    async def _stream(
        self,
        rid: str,
        outputs: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        cached_prompt_tokens: int | None = None,
        online: bool = True,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Relay an engine output stream as one GenerateResponse per engine step
        (``online``: the request's latencies count in the online windows too)."""
        st = self.state
        first_at: float | None = None
        counts: dict[int, int] = {}
        finished = False
        async with self._inflight(rid, context):
            arrived = time.monotonic()
            try:
                async with call_status(context, STREAM, self._classify(rid)):
                    track = self.metrics.track(outputs, count_prompt=cached_prompt_tokens is None)
                    async for out in track:
                        if rid in st.evicted:
                            await context.abort(
                                Code.UNAVAILABLE, st.evicted[rid], failure_metadata(FAILURE_REFUSED)
                            )
                        now = time.monotonic()
                        if first_at is None:
                            first_at = now
                            self.observe_ttft((now - arrived) * 1000.0, online)
                        deltas = []
                        for c in out.outputs:
                            if c.finish_reason == "abort" and c.stop_reason == LOST_IMAGES:
                                # Not the request's fault: the router continues it elsewhere.
                                await context.abort(
                                    Code.UNAVAILABLE,
                                    f"request {rid} must recompute image tokens without its images",
                                    failure_metadata(FAILURE_REFUSED),
                                )
                            counts[c.index] = counts.get(c.index, 0) + len(c.token_ids)
                            deltas.append(delta_to_proto(c, counts[c.index]))
                        finished = out.finished
                        delivery_log.mark("w", rid)
                        yield pb.GenerateResponse(
                            outputs=deltas,
                            prompt_tokens=len(out.prompt_token_ids),
                            cached_prompt_tokens=out.num_cached_tokens
                            if cached_prompt_tokens is None
                            else cached_prompt_tokens,
                            finished=out.finished,
                        )
                        delivery_log.mark("wd", rid)
                if first_at is not None and counts and (n_out := max(counts.values())) > 1:
                    tpot = (time.monotonic() - first_at) * 1000.0 / (n_out - 1)
                    self.observe_tpot(tpot, online)
            finally:
                if not finished:
                    # Client went away (or we failed): free the request's KV now.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.engine.abort(rid))

    async def _prompt(
        self,
        ids: Sequence[int],
        images: Sequence[pb.ImageData],
        context: grpc.aio.ServicerContext,
    ) -> list[int] | dict[str, Any]:
        """The engine prompt of a request: its token ids, with its images when it has some
        (INVALID_ARGUMENT for images this worker cannot take, UNAVAILABLE when an encoder's
        embeddings cannot be read)."""
        if not images:
            return list(ids)
        if self.images is None:
            await context.abort(
                Code.INVALID_ARGUMENT, f"model {self.engine.model_name} does not take images"
            )
        assert self.images is not None  # context.abort raised otherwise
        async with call_status(context, IMAGES):
            return await self.images.prompt(list(ids), images)
        raise AssertionError("unreachable")  # context.abort raises

    async def Encode(  # noqa: N802
        self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.EncodeResponse:
        await self._admit(context, ("encode",), request.role_epoch)
        if self.encoder is None:
            await context.abort(
                Code.FAILED_PRECONDITION, f"worker {self.state.instance_id} cannot encode images"
            )
        assert self.encoder is not None  # context.abort raised otherwise
        # NOTE: not unique: the router encodes a request's images in parallel calls.
        rid = f"encode:{request.request_id}"
        async with self._inflight(rid, context, unique=False), call_status(context, ENCODE):
            return await self.encoder.encode(request)
        raise AssertionError("unreachable")  # context.abort raises

    async def Abort(  # noqa: N802
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        found = request.request_id in self.state.inflight
        if found:
            await self.engine.abort(request.request_id)
        return pb.AbortResponse(found=found)

    async def SetRole(  # noqa: N802
        self, request: pb.SetRoleRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetRoleResponse:
        """Change role now, the same way a desired-role change in etcd does: drain the old
        role (bounded by the drain timeout), switch, bump the epoch. Under etcd membership
        the desired-role key wins at the next change of it or restart of the worker."""
        async with call_status(context, SET_ROLE):
            role = role_from_pb(request.role)
            role, epoch = await self.roles.change(role, request.expected_epoch)
        return pb.SetRoleResponse(role=role_to_pb(role), role_epoch=epoch)

    async def Drain(  # noqa: N802
        self, request: pb.DrainRequest, context: grpc.aio.ServicerContext
    ) -> pb.DrainResponse:
        st = self.state
        if st.draining != request.drain:
            st.draining = request.drain
            st.on_change()
        return pb.DrainResponse(draining=st.draining, num_inflight=len(st.inflight))

    async def ListRequests(  # noqa: N802
        self, request: pb.ListRequestsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRequestsResponse:
        reserved = sorted(rid for role in self.parts() for rid in role.held())
        return pb.ListRequestsResponse(
            request_ids=sorted(self.state.inflight), reserved_ids=reserved
        )
