"""The standard gRPC health service on a worker (grpc.health.v1.Health/Check).

A liveness answer, not a readiness one: it comes from the worker's event loop, so a worker that
answers is alive, whatever its engine is doing. A long step, a model's sleep or wake, or a
reservation waiting for KV runs on other threads or tasks and does not delay it; a worker
stopped (SIGSTOP) or whose loop is stuck does not answer, which is what a probe must catch.
NOT_SERVING only once the engine is dead (the worker is on its way out and exits non-zero).
Whether a worker should get new requests is the router's business (load reports, leases).
"""

from __future__ import annotations

from typing import Any

import grpc

from services.common.proto import health_pb2 as pb
from services.common.proto import health_pb2_grpc as pb_grpc
from services.common.proto import worker_pb2

# What Check answers for: the whole server ("") and the worker service by its full name.
SERVICES = ("", worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name)
Status = pb.HealthCheckResponse.ServingStatus


class HealthServicer(pb_grpc.HealthServicer):
    def __init__(self, engine: Any) -> None:
        self.engine = engine  # its ``is_running`` says whether the step thread still runs

    async def Check(  # noqa: N802 - the gRPC method's name
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        if request.service not in SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        running = getattr(self.engine, "is_running", True)
        return pb.HealthCheckResponse(status=Status.SERVING if running else Status.NOT_SERVING)


def add_health(server: grpc.aio.Server, engine: Any) -> None:
    pb_grpc.add_HealthServicer_to_server(HealthServicer(engine), server)


def check(address: str, timeout: float) -> bool | None:
    """Probe a worker from a plain (non-asyncio) caller: True when it answered (any status: it
    is alive), False when it did not within ``timeout`` (stopped, its loop stuck), None when
    nothing listens or the call failed otherwise (starting, restarting in place for a model
    load, or a TLS-only worker: not this probe's to judge; a dead process is seen exiting)."""
    # NOTE: no proxy: gRPC, like urllib, sends even 127.0.0.1 to the one in http_proxy.
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        call = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=pb.HealthCheckRequest.SerializeToString,
            response_deserializer=pb.HealthCheckResponse.FromString,
        )
        try:
            call(pb.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False
            answered = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED)
            return True if code in answered else None
        return True
