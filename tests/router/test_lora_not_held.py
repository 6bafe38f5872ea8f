"""A request for an adapter its worker unloaded meanwhile (load/unload racing requests): the
worker answers NOT_FOUND, the router tries another worker holding it, and with none left the
client gets the 404 of an unknown model, not a 400 that blames its request (chaos6's attack
round: 3 such 400s in 12 load/unload cycles under 3 clients)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fake_handles import fake_handle, fake_pool, keep_reporting, rpc_error
from test_worker_restart_wait import Call, Continues

from services.common.proto import worker_pb2 as pb
from services.engine.outputs import LoRANotLoaded
from services.router.errors import APIError
from services.router.routing.orchestrator import Orchestrator
from services.router.routing.policies.factory import create_policy
from services.worker.errors import PARAMS, STREAM, call_status


class Unloaded:
    """A worker that dropped the adapter after the router's view of it was taken."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []

    def Generate(self, req: pb.GenerateRequest, timeout: float):  # noqa: N802
        self.requests.append(req)

        async def stream():
            raise rpc_error(grpc.StatusCode.NOT_FOUND, "LoRA adapter 'sql' is not loaded")
            yield  # an async generator

        return Call(stream())


def run(stubs) -> list[list[int]]:
    async def main() -> list[list[int]]:
        handles = [fake_handle(f"w{i}", stub) for i, stub in enumerate(stubs)]  # on the loop
        for h in handles:
            h.lora_adapters = frozenset({"sql"})
        reporting = asyncio.create_task(keep_reporting(handles))
        orch = Orchestrator(fake_pool(handles), create_policy("round_robin"), timeout_s=30.0,
                            max_attempts=3)  # fmt: skip
        try:
            params = pb.SamplingParams(max_tokens=1)
            return [list(m.outputs[0].token_ids)
                    async for m in orch.generate("sql", "r1", [1, 2], params)]  # fmt: skip
        finally:
            reporting.cancel()

    return asyncio.run(main())


def test_another_worker_holding_the_adapter_takes_the_request() -> None:
    gone, holder = Unloaded(), Continues()
    assert run([gone, holder]) == [[8]]
    assert len(gone.requests) == 1 and len(holder.requests) == 1  # tried first, then the holder


def test_with_no_worker_holding_it_the_client_gets_404_model_not_found() -> None:
    with pytest.raises(APIError) as err:
        run([Unloaded()])
    assert err.value.status == 404 and err.value.code == "model_not_found", err.value.message


class Aborted(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    async def abort(self, code, details, metadata=()):  # type: ignore[no-untyped-def]
        self.code = code
        raise Aborted(details)


@pytest.mark.parametrize("rules", [PARAMS, STREAM])
def test_the_worker_answers_not_found_for_an_adapter_it_does_not_hold(rules) -> None:
    async def main() -> tuple[grpc.StatusCode | None, grpc.StatusCode | None]:
        codes = []
        for exc in (LoRANotLoaded("LoRA adapter 'sql' is not loaded"), ValueError("bad")):
            ctx = Context()
            with pytest.raises(Aborted):
                async with call_status(ctx, rules):  # type: ignore[arg-type]
                    raise exc
            codes.append(ctx.code)
        return codes[0], codes[1]

    assert asyncio.run(main()) == (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
