"""Migration carries a request's LoRA adapter: a stream for an adapter whose worker dies mid
stream goes on, from its tokens, on another worker that holds the adapter (never on one that
does not), and the resumed request names the adapter."""

from __future__ import annotations

import asyncio

import pytest
from fake_handles import fake_handle, fake_pool, keep_reporting
from test_worker_restart_wait import Continues, DiesMidStream

from services.common.proto import worker_pb2 as pb
from services.router.routing.orchestrator import Orchestrator
from services.router.routing.policies.factory import create_policy


@pytest.mark.parametrize("holder_first", [True, False])
def test_a_migrated_adapter_request_keeps_its_adapter(holder_first: bool) -> None:
    async def main() -> None:
        holder, plain = Continues(), Continues()
        dying = fake_handle("w0", DiesMidStream())
        handles = [fake_handle("w1", holder), fake_handle("w2", plain)]
        if not holder_first:  # the policy's order must not matter
            handles.reverse()
        for h in (dying, *handles):
            h.lora_adapters = frozenset({"sql"} if h.id in ("w0", "w1") else ())
        pool = fake_pool([dying, *handles])
        reporting = asyncio.create_task(keep_reporting(handles))
        orch = Orchestrator(pool, create_policy("round_robin"), timeout_s=30.0, max_attempts=3)
        try:
            params = pb.SamplingParams(max_tokens=3)
            out = [list(m.outputs[0].token_ids)
                   async for m in orch.generate("sql", "r1", [1, 2], params)]  # fmt: skip
        finally:
            reporting.cancel()
        assert out == [[5], [6], [8]]
        assert not plain.requests  # w2 does not hold the adapter
        (req,) = holder.requests
        assert req.lora == "sql" and list(req.resume.output_token_ids) == [5, 6]

    asyncio.run(main())
