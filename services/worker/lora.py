"""The worker's LoRA adapter RPCs: load a PEFT folder into the engine under a name, unload
one. The loaded names travel in every load report (``LoadReport.lora_adapters``), which is
how routers learn which worker holds which adapter. At start, ``restore_adapters`` loads
those the cluster's API loaded before (``common/lora_registry.py``)."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

import grpc

from services.common.lora_registry import LoRARegistry
from services.common.proto import worker_pb2 as pb
from services.worker.errors import LORA, call_status

if TYPE_CHECKING:
    from services.engine.async_engine import AsyncLLMEngine

log = logging.getLogger(__name__)

RESTORE_RETRY_S = (1.0, 2.0, 4.0, 8.0)  # then every 8 s until etcd answers


def adapter_names(engine: AsyncLLMEngine) -> list[str]:
    """Names of the adapters the engine holds (none when LoRA is off or not started)."""
    loras = getattr(getattr(engine, "engine", None), "loras", None)
    return sorted(loras.adapters) if loras is not None else []


def resident_adapters(engine: AsyncLLMEngine) -> tuple[list[str], int]:
    """(adapters in an engine slot now, number of slots); ([], 0) when LoRA is off."""
    loras = getattr(getattr(engine, "engine", None), "loras", None)
    return (loras.resident_adapters(), loras.max_loras) if loras is not None else ([], 0)


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


def _add(engine, name: str, path: str) -> None:
    _loras(engine).add(name, path)


def _loras(engine):
    if engine.loras is None:
        raise ValueError("LoRA is not enabled on this worker (start it with --enable-lora)")
    return engine.loras


async def restore_adapters(engine: AsyncLLMEngine, registry: LoRARegistry, model: str) -> None:
    """Load the adapters recorded for ``model`` (retrying until etcd answers once; an adapter
    that fails to load is logged and left out). Closes ``registry``."""
    attempt = 0
    try:
        while True:
            try:
                records = await registry.adapters(model)
                break
            except Exception as exc:  # noqa: BLE001 - etcd away: again later
                wait = RESTORE_RETRY_S[min(attempt, len(RESTORE_RETRY_S) - 1)]
                attempt += 1
                log.warning("listing the recorded LoRA adapters failed (%s); again in %.0fs",
                            exc, wait)  # fmt: skip
                await asyncio.sleep(wait)
    finally:
        await registry.close()
    for name, record in records.items():
        try:
            await engine.call(functools.partial(_add, name=name, path=record.path))
            log.info("loaded the recorded LoRA adapter %s from %s", name, record.path)
        except Exception as exc:  # noqa: BLE001 - one bad adapter leaves the others
            log.error("cannot load the recorded LoRA adapter %s (%s): %s", name, record.path, exc)
