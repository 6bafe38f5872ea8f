"""The worker's expert load balancing RPC: re-place an expert-parallel MoE model's experts on
its ranks between two engine steps (services/engine/expert_balance.py), from the load recorded
so far or as a given placement says. The router's admin API and ``epdserve experts`` call it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import grpc

from services.common.proto import worker_pb2 as pb
from services.engine.eplb import ExpertPlacement, placements_from_json, placements_to_json
from services.worker.errors import PARAMS, call_status

if TYPE_CHECKING:
    from services.engine.async_engine import AsyncLLMEngine


class ExpertRPCs:
    """``RebalanceExperts`` of the WorkerService (mixed into its servicer)."""

    engine: AsyncLLMEngine

    async def RebalanceExperts(  # noqa: N802 - gRPC method name
        self, request: pb.RebalanceExpertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RebalanceExpertsResponse:
        slots = request.num_slots or None
        async with call_status(context, PARAMS):
            given = _placements(request.placement_json)
            # NOTE: on the step thread, between two steps: running requests wait, none is lost.
            report = await self.engine.call(lambda e: e.executor.rebalance_experts(slots, given))
        return pb.RebalanceExpertsResponse(
            imbalance_before=report.before,
            imbalance_after=report.after,
            placement_json=json.dumps(placements_to_json(report.placements)),
            saved_to=report.saved_to,
        )


def _placements(text: str) -> list[ExpertPlacement] | None:
    """The placement a request gives (None: compute one); ValueError for a bad one."""
    if not text:
        return None
    try:
        return placements_from_json(json.loads(text))
    except ValueError as exc:  # JSONDecodeError included
        raise ValueError(f"placement_json: {exc}") from None
