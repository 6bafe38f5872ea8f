"""The worker's load and health RPCs: ``Health``, and ``StreamLoad``'s load reports (queue,
batch, KV use, recent latencies, adapters), which is how routers choose and judge workers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from services.common.grpc_utils import role_to_pb
from services.common.latency import LatencyWindow
from services.common.proto import worker_pb2 as pb
from services.worker.lora import adapter_names, resident_adapters
from services.worker.state import WorkerState

if TYPE_CHECKING:
    from services.encoder.role import EncodeRole


class LoadRPCs:
    """``Health`` and ``StreamLoad`` of the WorkerService (mixed into its servicer)."""

    engine: Any
    state: WorkerState
    encoder: EncodeRole | None
    ttft_ms: LatencyWindow  # every request's
    tpot_ms: LatencyWindow
    online_ttft_ms: LatencyWindow  # online (priority and default tier) requests' only
    online_tpot_ms: LatencyWindow
    closing: asyncio.Event  # ends StreamLoad streams at shutdown
    load_interval_ms: int
    # An engine that finishes no model layer this long while it has requests (stuck, not slow:
    # services/engine/heartbeat.py) sends no load reports, so routers take the worker out of
    # routing and move its streams (WorkerConfig).
    engine_stall_s: float = 30.0

    async def Health(  # noqa: N802
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        st = self.state
        busy = st.draining or st.flipping
        status = pb.HealthResponse.DRAINING if busy else pb.HealthResponse.SERVING
        return pb.HealthResponse(
            status=status,
            instance_id=st.instance_id,
            incarnation=st.incarnation,
            role=role_to_pb(st.role),
            role_epoch=st.role_epoch,
            model=self.engine.model_name,
            max_model_len=self.engine.max_model_len,
            num_inflight=len(st.inflight),
        )

    def observe_ttft(self, ms: float, online: bool) -> None:
        """A request's time to its first token (a prefill worker: its Prefill call)."""
        self.ttft_ms.add(ms)
        if online:
            self.online_ttft_ms.add(ms)

    def observe_tpot(self, ms: float, online: bool) -> None:
        """A request's mean time per output token after the first."""
        self.tpot_ms.add(ms)
        if online:
            self.online_tpot_ms.add(ms)

    def engine_stalled_s(self) -> float:
        """How long the engine has made no progress (no pass begun, no layer finished) with
        requests waiting on it."""
        stalled = getattr(self.engine, "stalled_s", None)  # test fakes have no step thread
        return stalled() if stalled is not None else 0.0

    def load_report(self) -> pb.LoadReport:
        s = self.engine.stats()
        st = self.state
        enc = self.encoder
        resident, slots = resident_adapters(self.engine)
        return pb.LoadReport(
            instance_id=st.instance_id,
            role=role_to_pb(st.role),
            role_epoch=st.role_epoch,
            draining=st.draining or st.flipping,  # routers skip a worker mid-flip too
            num_waiting=s.num_waiting,
            num_waiting_prompt_tokens=s.num_waiting_prompt_tokens,
            num_running=s.num_running,
            num_inflight=len(st.inflight),
            kv_utilization=s.kv_utilization,
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            recent_ttft_ms=self.ttft_ms.mean(),
            recent_tpot_ms=self.tpot_ms.mean(),
            timestamp_ms=int(time.time() * 1000),
            images_waiting=enc.waiting if enc is not None else 0,
            images_encoding=enc.encoding if enc is not None else 0,
            recent_encode_ms=enc.tower_ms.mean() if enc is not None else 0.0,
            lora_adapters=adapter_names(self.engine),
            lora_resident=resident,
            lora_slots=slots,
            spec_num_drafts=s.spec.num_drafts if s.spec else 0,
            spec_draft_tokens=s.spec.num_draft_tokens if s.spec else 0,
            spec_accepted_tokens=s.spec.num_accepted_tokens if s.spec else 0,
            recent_online_ttft_ms=self.online_ttft_ms.mean(),
            recent_online_tpot_ms=self.online_tpot_ms.mean(),
            num_offline_waiting=s.num_offline_waiting,
            num_offline_waiting_prompt_tokens=s.num_offline_waiting_prompt_tokens,
            num_offline_running=s.num_offline_running,
            num_offline_blocks=s.num_offline_blocks,
            step_fixed_ms=s.step_fixed_ms,
            step_token_ms=s.step_token_ms,
            recent_online_tpot_offline_share=s.online_tpot_offline_share,
            engine_stalled_ms=self.engine_stalled_s() * 1000.0,
        )

    async def StreamLoad(  # noqa: N802
        self, request: pb.LoadReportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LoadReport]:
        interval = (request.interval_ms or self.load_interval_ms) / 1000.0
        interval = max(interval, 0.01)
        while not self.closing.is_set():
            if not getattr(self.engine, "is_running", True):
                # NOTE: a dead engine ends the stream before the worker's shutdown sets
                # ``draining`` (worker/main.py; same event loop, no await in between): a
                # router takes a draining worker for one leaving on purpose and would not
                # wait for its restart, so the requests it ran failed with no_workers.
                return
            # NOTE: a stalled engine goes silent rather than reporting: silence is what the
            # routers already treat as a hung worker (routing/watch.py), and the reports
            # come back by themselves once the step ends.
            if self.engine_stalled_s() <= self.engine_stall_s:
                yield self.load_report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), timeout=interval)
