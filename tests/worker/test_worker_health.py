"""The worker's gRPC health service (services/worker/health.py) and the probe `epdserve up` runs
against it: an answer passes (SERVING, or NOT_SERVING once the engine is dead), a server that
accepts the connection and never answers fails (a stopped worker), and nothing listening is not
judged (a worker starting, or restarting in place for a model load)."""

from __future__ import annotations

import asyncio

import grpc

from services.common import event_loop
from services.common.net import free_port
from services.common.proto import health_pb2 as pb
from services.common.proto import health_pb2_grpc as pb_grpc
from services.worker.health import add_health, check
from tests.silent_socket import silent_listener


class Engine:
    is_running = True


async def _serve_and_probe(engine: Engine) -> dict[str, object]:
    server = grpc.aio.server()
    add_health(server, engine)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out: dict[str, object] = {}
    try:
        address = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.HealthStub(channel)
            out["serving"] = (await stub.Check(pb.HealthCheckRequest(), timeout=10)).status
            named = pb.HealthCheckRequest(service="epdserve.v1.WorkerService")
            out["named"] = (await stub.Check(named, timeout=10)).status
            try:
                await stub.Check(pb.HealthCheckRequest(service="nope"), timeout=10)
            except grpc.aio.AioRpcError as exc:
                out["unknown"] = exc.code()
            out["probe"] = await asyncio.to_thread(check, address, 5.0)
            engine.is_running = False
            out["dead"] = (await stub.Check(pb.HealthCheckRequest(), timeout=10)).status
            out["probe_dead"] = await asyncio.to_thread(check, address, 5.0)
    finally:
        await server.stop(0)
    return out


def test_health_check_answers_from_the_worker_loop() -> None:
    out = event_loop.run(_serve_and_probe(Engine()))
    status = pb.HealthCheckResponse.ServingStatus
    assert out["serving"] == status.SERVING and out["named"] == status.SERVING
    assert out["unknown"] == grpc.StatusCode.NOT_FOUND
    assert out["dead"] == status.NOT_SERVING
    assert out["probe"] is True and out["probe_dead"] is True  # alive: it answered


def test_probe_fails_on_silence_and_says_nothing_when_nothing_listens() -> None:
    # A listener that accepts (the kernel's backlog, as for a SIGSTOPped process), never reads.
    with silent_listener() as port:
        assert check(f"127.0.0.1:{port}", 1.0) is False
    assert check(f"127.0.0.1:{free_port()}", 1.0) is None
