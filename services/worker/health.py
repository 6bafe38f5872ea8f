"""The standard gRPC health service on a worker (grpc.health.v1.Health/Check).

A liveness answer, not a readiness one: it comes from the worker's event loop, so a worker that
answers is alive, whatever its engine is doing. A long step, a model's sleep or wake, or a
reservation waiting for KV runs on other threads or tasks and does not delay it; a worker
stopped (SIGSTOP) or whose loop is stuck does not answer, which is what a probe must catch.
NOT_SERVING only once the engine is dead (the worker is on its way out and exits non-zero).
Whether a worker should get new requests is the router's business (load reports, leases).
Asked for the worker service by name (the routers ask so when its load reports are late:
routing/workers.py; `epdserve up` and the Helm chart's liveness probe ask so too), it is also
NOT_SERVING while the engine has finished no model layer for over ``engine_stall_s``, as its load
reports then stop on purpose (load.py); the whole server ("") stays SERVING. A liveness probe
counts a stall as a failure: a tensor-parallel rank stopped or hung for good would otherwise leave its worker
out of routing, never restarted, for ever (its requests moved, or failed after the restart
wait). A stall that ends within the probes' window (``liveness_failures`` probes) kills nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import grpc

from services.common.grpc_utils import GrpcTLS
from services.common.proto import health_pb2 as pb
from services.common.proto import health_pb2_grpc as pb_grpc
from services.common.proto import worker_pb2

# What Check answers for: the whole server ("") and the worker service by its full name.
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
SERVICES = ("", WORKER_SERVICE)
Status = pb.HealthCheckResponse.ServingStatus


class HealthServicer(pb_grpc.HealthServicer):
    def __init__(self, engine: Any, engine_stall_s: float = float("inf")) -> None:
        self.engine = engine  # its ``is_running`` says whether the step thread still runs
        self.engine_stall_s = engine_stall_s  # WorkerConfig.engine_stall_s

    async def Check(  # noqa: N802 - the gRPC method's name
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        if request.service not in SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        running = getattr(self.engine, "is_running", True)
        if running and request.service == WORKER_SERVICE:
            stalled = getattr(self.engine, "stalled_s", None)  # test fakes have no step thread
            running = stalled is None or stalled() <= self.engine_stall_s
        return pb.HealthCheckResponse(status=Status.SERVING if running else Status.NOT_SERVING)


def add_health(server: grpc.aio.Server, engine: Any, engine_stall_s: float = float("inf")) -> None:
    pb_grpc.add_HealthServicer_to_server(HealthServicer(engine, engine_stall_s), server)


def check(
    address: str, timeout: float, tls: GrpcTLS | None = None, service: str = ""
) -> bool | None:
    """Probe a worker from a plain (non-asyncio) caller: True when it answered (any status: it
    is alive; for a named ``service``, SERVING), False when it did not within ``timeout``
    (stopped, its loop stuck) or ``service`` answered NOT_SERVING (WORKER_SERVICE: its engine
    stalled past ``engine_stall_s``, or dead), None when
    nothing listens or the call failed otherwise (starting, restarting in place for a model
    load, or a TLS-only worker: not this probe's to judge; a dead process is seen exiting).
    ``tls``: the worker's mutual TLS, with a certificate its CA signed."""
    # NOTE: no proxy: gRPC, like urllib, sends even 127.0.0.1 to the one in http_proxy.
    options: list[tuple[str, int | str]] = [("grpc.enable_http_proxy", 0)]
    if tls is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel = grpc.secure_channel(address, tls.channel_credentials(), options=options)
    with channel:
        call = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=pb.HealthCheckRequest.SerializeToString,
            response_deserializer=pb.HealthCheckResponse.FromString,
        )
        try:
            answer = call(pb.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False
            answered = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED)
            return True if code in answered else None
        return not service or answer.status == Status.SERVING


def main(argv: list[str] | None = None) -> int:
    """``python -m services.worker.health``: Kubernetes' liveness probe (an exec probe) of a
    worker on mutual TLS, which the kubelet's own gRPC probe cannot call (no client
    certificate). Exit 0 when the worker answered within ``--timeout``, else 1 (the reason on
    stderr, which the kubelet records)."""
    ap = argparse.ArgumentParser(prog="python -m services.worker.health", description=main.__doc__)
    ap.add_argument(
        "--host",
        default=os.environ.get("POD_IP") or "127.0.0.1",
        help="the worker's address (default: $POD_IP, where a pod's worker binds)",
    )
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    ap.add_argument(
        "--service",
        default="",
        choices=SERVICES,
        help=f"'' (the default): any answer passes; {WORKER_SERVICE}: fails while the engine "
        "is stuck (no progress for the worker's --engine-stall-s) or dead",
    )
    ap.add_argument("--tls-ca")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--server-name", help="name in the worker's certificate (else the host)")
    args = ap.parse_args(argv)
    if not 0 < args.timeout <= 3600:  # NOTE: also refuses NaN
        ap.error("--timeout must be in (0, 3600]")
    try:
        tls = GrpcTLS.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.server_name)
        answered = check(f"{args.host}:{args.port}", args.timeout, tls, args.service)
    except ValueError as exc:  # a missing or unreadable TLS file
        print(f"health probe: {exc}", file=sys.stderr)
        return 1
    if answered:
        return 0
    why = "no answer within the timeout" if answered is False else "the call failed"
    if answered is False and args.service:
        why += f", or {args.service} is NOT_SERVING (its engine stuck or dead)"
    print(f"health probe of {args.host}:{args.port}: {why}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
