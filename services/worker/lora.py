"""The worker's LoRA adapter RPCs: load a PEFT folder into the engine under a name, unload
one. The loaded names travel in every load report (``LoadReport.lora_adapters``), which is
how routers learn which worker holds which adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from services.common.proto import worker_pb2 as pb
from services.worker.errors import LORA, call_status

if TYPE_CHECKING:
    from services.engine.async_engine import AsyncLLMEngine


def adapter_names(engine: AsyncLLMEngine) -> list[str]:
    """Names of the adapters the engine holds (none when LoRA is off or not started)."""
    loras = getattr(getattr(engine, "engine", None), "loras", None)
    return sorted(loras.adapters) if loras is not None else []


class LoRARPCs:
    """``LoadLoRA`` and ``UnloadLoRA`` of the WorkerService (mixed into its servicer)."""

    engine: AsyncLLMEngine

    async def LoadLoRA(  # noqa: N802 - gRPC method name
        self, request: pb.LoadLoRARequest, context: grpc.aio.ServicerContext
    ) -> pb.LoRAAdaptersResponse:
        async with call_status(context, LORA):
            if not request.name or not request.path:
                raise ValueError("a LoRA adapter needs a name and a path")
            await self.engine.call(lambda e: _loras(e).add(request.name, request.path))
        return pb.LoRAAdaptersResponse(adapters=adapter_names(self.engine))

    async def UnloadLoRA(  # noqa: N802
        self, request: pb.UnloadLoRARequest, context: grpc.aio.ServicerContext
    ) -> pb.LoRAAdaptersResponse:
        async with call_status(context, LORA):
            await self.engine.call(lambda e: _loras(e).remove(request.name))
        return pb.LoRAAdaptersResponse(adapters=adapter_names(self.engine))


def _loras(engine):
    if engine.loras is None:
        raise ValueError("LoRA is not enabled on this worker (start it with --enable-lora)")
    return engine.loras
