"""How the exceptions a WorkerService call raises become its gRPC status (the one place)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.grpc_utils import (
    FAILURE_BUSY,
    FAILURE_ENGINE,
    FAILURE_REQUEST,
    FAILURE_TRANSFER,
    failure_metadata,
)
from services.common.mooncake_agent import TransferError
from services.decode.role import TPSizeMismatch
from services.engine.distributed import RankFailure
from services.engine.outputs import LoRANotLoaded, RequestFailedError
from services.worker.role_controller import StaleEpochError

log = logging.getLogger(__name__)

Code = grpc.StatusCode


@dataclass(frozen=True)
class Status:
    """How a call that raised some exception ends."""

    code: grpc.StatusCode
    prefix: str = ""  # put before the exception's text in the status details
    kind: str | None = None  # the failure kind the router reads (grpc_utils.FAILURE_*)


# Which exceptions each call ends with which status (the first class that matches wins).
Rules = dict[type[Exception] | tuple[type[Exception], ...], Status]
BAD_REQUEST = Status(Code.INVALID_ARGUMENT)
# An adapter unloaded while the router still routed to it here: another worker may hold it
# (the router tries one), else the client gets the 404 of an unknown model. Listed before
# ValueError, its base class.
NOT_HELD: Rules = {LoRANotLoaded: Status(Code.NOT_FOUND)}
PARAMS: Rules = {**NOT_HELD, (ValueError, TypeError): BAD_REQUEST}
STREAM: Rules = {**NOT_HELD, ValueError: BAD_REQUEST}
IMAGES: Rules = {ValueError: BAD_REQUEST, TransferError: Status(Code.UNAVAILABLE)}
RESERVE: Rules = {
    **NOT_HELD,
    (ValueError, TypeError): BAD_REQUEST,
    # Not the request's fault: the pair cannot exchange KV; another pair may.
    TPSizeMismatch: Status(Code.FAILED_PRECONDITION),
    # Backpressure, not a failure: the blocks free up as requests finish.
    MemoryError: Status(Code.RESOURCE_EXHAUSTED, "decode worker full, retry later: ", FAILURE_BUSY),
}
PREFILL: Rules = {
    **NOT_HELD,
    (ValueError, TypeError): BAD_REQUEST,
    TransferError: Status(Code.UNAVAILABLE, "KV transfer failed: ", FAILURE_TRANSFER),
}
ENCODE: Rules = {
    ValueError: BAD_REQUEST,
    RuntimeError: Status(Code.UNAVAILABLE, "encoder failed: "),
}
LORA: Rules = {
    ValueError: BAD_REQUEST,
    KeyError: Status(Code.NOT_FOUND, "no LoRA adapter "),
    # A tensor-parallel rank failed or timed out reading it: no rank holds it (lora_manager).
    RankFailure: Status(Code.UNAVAILABLE, "LoRA adapter not loaded: "),
}
SET_ROLE: Rules = {ValueError: BAD_REQUEST, StaleEpochError: Status(Code.FAILED_PRECONDITION)}


@dataclass(frozen=True)
class Classify:
    """A call that classifies what its rules do not name: the request it runs, the worker,
    and the counter of requests that failed here."""

    rid: str
    worker: str
    failures: Any  # a prometheus Counter


@contextlib.asynccontextmanager
async def call_status(
    context: grpc.aio.ServicerContext, rules: Rules, classify: Classify | None = None
) -> AsyncIterator[None]:
    """End the call with the status of the first of ``rules`` that matches what the block
    raised. Anything else propagates (UNKNOWN), or with ``classify``: a RuntimeError
    (EngineDeadError and the like) is the engine's: UNAVAILABLE, kind "engine", the router
    may go elsewhere; anything else failed here because of the request itself: INTERNAL,
    kind "request"; the worker is fine, and the router must not send it elsewhere."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified for the router
        for classes, status in rules.items():
            if isinstance(exc, classes):
                metadata = failure_metadata(status.kind) if status.kind else ()
                await context.abort(status.code, f"{status.prefix}{exc}", metadata)
        if classify is None:
            raise
        if isinstance(exc, RuntimeError):
            await context.abort(
                Code.UNAVAILABLE, f"engine failed: {exc}", failure_metadata(FAILURE_ENGINE)
            )
        if not isinstance(exc, RequestFailedError):
            log.exception("request %s failed", classify.rid)
        classify.failures.inc()
        await context.abort(
            Code.INTERNAL,
            f"request {classify.rid} failed on worker {classify.worker}: {exc}",
            failure_metadata(FAILURE_REQUEST),
        )
