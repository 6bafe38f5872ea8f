"""The Pool call of pooling-model workers (embeddings, rerank, score): a servicer mixin.

A pooling model serves role ``mixed`` only: it keeps no KV, so prefill and decode roles have
nothing to hand over (``check_role``). The inputs of one call join the engine's pooling queue
together, where they batch with every other call's (engine/pooler.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc

from services.common.proto import worker_pb2 as pb
from services.engine.pooling_params import PoolingParams
from services.worker.errors import PARAMS, STREAM, Classify, call_status

# Values of the endpoint label of the pooling metrics (the router's HTTP APIs).
POOLING_ENDPOINTS = ("embeddings", "rerank", "score")


def pooling_task(engine: Any) -> str | None:
    """The engine's pooling task (None: a generative model, or a test double without one)."""
    inner = getattr(engine, "engine", None)
    return getattr(inner, "pooling_task", None)


def check_role(engine: Any, role: str, otherwise: bool = True) -> bool:
    """ValueError when ``role`` cannot run a pooling model (anything but mixed); else
    ``otherwise`` (what the other checks say)."""
    task = pooling_task(engine)
    if task is not None and role != "mixed":
        raise ValueError(
            f"the model is a pooling model ({task}): it serves role 'mixed' only, not {role!r}"
        )
    return otherwise


class PoolingCalls:
    """``Pool``: mixed into WorkerServicer, whose engine, state, metrics and helpers it uses."""

    engine: Any
    metrics: Any
    _admit: Any
    _inflight: Any
    _classify: Any

    async def Pool(  # noqa: N802 - gRPC method name
        self, request: pb.PoolRequest, context: grpc.aio.ServicerContext
    ) -> pb.PoolResponse:
        await self._admit(context, ("mixed",), request.role_epoch)
        endpoint = request.endpoint if request.endpoint in POOLING_ENDPOINTS else "embeddings"
        arrived = time.monotonic()
        rid = request.request_id or uuid.uuid4().hex
        outcome = "invalid"
        try:
            async with call_status(context, PARAMS):
                if not request.inputs:
                    raise ValueError("no inputs")
                params = PoolingParams(task=request.task, dimensions=request.dimensions or None)
            classify: Classify = self._classify(rid)
            async with self._inflight(rid, context), call_status(context, STREAM, classify):
                outcome = "error"
                tasks = [
                    asyncio.ensure_future(self.engine.pool(f"{rid}-{i}", list(inp.ids), params))
                    for i, inp in enumerate(request.inputs)
                ]
                try:
                    outs = await asyncio.gather(*tasks)
                finally:
                    for task in tasks:  # one input failed: the others leave the queue too
                        task.cancel()
            outcome = "success"
        finally:
            self.metrics.observe_pool(endpoint, outcome, time.monotonic() - arrived)
        self.metrics.pooled(endpoint, len(outs), sum(o.num_prompt_tokens for o in outs))
        return pb.PoolResponse(
            outputs=[pb.PooledVector(data=o.data, prompt_tokens=o.num_prompt_tokens) for o in outs]
        )
