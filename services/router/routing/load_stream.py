"""A worker's load stream, as the router follows it: each report updates its handle; a
stream silent past the stale bound takes the worker out of routing, unless it answers a
grpc.health.v1 Check (a host loaded to 100 delays reports while the worker serves)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from services.common.proto import health_pb2
from services.common.proto import worker_pb2 as pb

log = logging.getLogger(__name__)


class Followed(Protocol):
    """What the load stream reads and sets of a worker: a routing.workers.WorkerHandle (not
    imported: that module imports this one, and tests/test_structure.py counts a
    TYPE_CHECKING import as a cycle)."""

    @property
    def id(self) -> str: ...

    stub: Any  # the worker's stub (TracedStub): StreamLoad
    health: Any  # its grpc.health.v1 HealthStub
    interval_ms: int
    stale_s: float
    load: pb.LoadReport | None
    load_at: float
    answered_at: float
    lora_adapters: frozenset[str]
    lora_resident: frozenset[str]
    lora_slots: int
    ended_since_report: int
    prompt_tokens_ended_since_report: int
    departed_at: float
    progress_at: float
    on_gone: Callable[[Any], None] | None

    def departed_for_good(self, now: float) -> bool: ...

    def mark_failed(self) -> None: ...


# The worker service's name in grpc.health.v1 (services/worker/health.py): asked by name, a
# worker whose engine is stuck past its engine_stall_s answers NOT_SERVING.
WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["WorkerService"].full_name


async def answers(handle: Followed) -> bool:
    """Whether the worker answers a health Check for its worker service SERVING within
    half the stale bound (its reports are late: a host loaded to 100 delays them past
    the bound while the worker serves): if so it is alive (``alive_at``). A stopped or
    hung worker, or one whose engine is stuck (NOT_SERVING), does not."""
    try:
        answer = await handle.health.Check(
            health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=handle.stale_s / 2
        )
    except grpc.aio.AioRpcError:
        return False
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return False
    if handle.answered_at < handle.load_at:  # said once per late spell
        log.info("%s sends no load report for %.1f s but answers: slow, not hung",
                 handle.id, time.monotonic() - handle.load_at)  # fmt: skip
    handle.answered_at = time.monotonic()
    return True


async def follow_load(handle: Followed) -> None:
    backoff = 0.1
    while True:
        call = handle.stub.StreamLoad(pb.LoadReportRequest(interval_ms=handle.interval_ms))
        read = asyncio.ensure_future(call.read())
        try:
            while True:
                # A silent stream counts as a dead worker, unless it answers a health
                # Check (slowed down, not hung): bound each wait.
                done, _ = await asyncio.wait({read}, timeout=handle.stale_s / 2)
                if not done:
                    if await answers(handle):
                        continue  # the same read goes on: the report is only late
                    raise TimeoutError
                report = read.result()
                if report is grpc.aio.EOF:
                    break
                read = asyncio.ensure_future(call.read())
                handle.load = report
                handle.lora_adapters = frozenset(report.lora_adapters)
                handle.lora_resident = frozenset(report.lora_resident)
                handle.lora_slots = report.lora_slots
                handle.load_at = time.monotonic()
                if report.num_running or report.num_waiting:  # its engine's last progress
                    handle.progress_at = handle.load_at - report.engine_stalled_ms / 1000.0
                handle.ended_since_report = handle.prompt_tokens_ended_since_report = 0
                backoff = 0.1
                if handle.departed_for_good(handle.load_at) and handle.on_gone is not None:
                    handle.on_gone(handle)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "silent"
            log.info("load stream from %s broke: %s", handle.id, reason)
        finally:
            call.cancel()
            read.cancel()
        # Take it out of routing now rather than waiting for the stale timeout.
        handle.mark_failed()
        if handle.departed_at and handle.on_gone is not None:
            handle.on_gone(handle)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 2.0)
