"""The workers' liveness probe as `helm template` renders it: the kubelet's gRPC probe on the
health service on plain gRPC; with mutual TLS an exec probe running the same check with the
worker's certificate (the kubelet's gRPC probe has none, and the /metrics probe used before
passed for a stuck event loop). The rendered exec command is run here against a real
mutual-TLS worker health server: it passes on an answer and fails on a silent one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest

from services.common.grpc_utils import GrpcTLS, add_port
from services.worker.health import add_health
from tests.deps import HELM, require
from tests.silent_socket import silent_listener
from tests.tls_certs import TestCA

require("helm_python", HELM)

import chart_helpers as ch  # noqa: E402

COMPONENT = "app.kubernetes.io/component"
TLS = {"grpcTlsCa": "/tls/ca.crt", "grpcTlsCert": "/tls/tls.crt", "grpcTlsKey": "/tls/tls.key"}


def _worker_liveness(values: dict) -> dict[str, dict]:
    return {
        o["metadata"]["labels"][COMPONENT]: o["spec"]["template"]["spec"]["containers"][0][
            "livenessProbe"
        ]
        for o in ch.render_objects(values)
        if o["kind"] == "Deployment"
        and o["metadata"].get("labels", {}).get(COMPONENT, "").startswith("worker-")
    }


def test_plain_grpc_workers_get_the_kubelets_grpc_probe() -> None:
    plain = _worker_liveness({})
    # The worker service: NOT_SERVING while the engine is stuck (a rank stopped for good).
    want = {"port": 50051, "service": "epdserve.v1.WorkerService"}
    assert plain and all(p["grpc"] == want and "exec" not in p for p in plain.values())
    assert all(p["timeoutSeconds"] == 10 for p in plain.values())


def test_mutual_tls_workers_get_an_exec_probe_of_their_health_service() -> None:
    mutual = _worker_liveness({"workers": {"config": TLS, "probes": {"livenessTimeoutSeconds": 7}},
                               "router": {"config": {"grpcTlsServerName": "epdserve-worker"}}})  # fmt: skip
    assert mutual
    for p in mutual.values():
        assert "httpGet" not in p and "grpc" not in p  # /metrics passed for a stuck loop
        assert p["timeoutSeconds"] == 7
        assert p["exec"]["command"] == [
            "python", "-m", "services.worker.health", "--port", "50051",
            "--service", "epdserve.v1.WorkerService", "--timeout", "5",
            "--tls-ca", "/tls/ca.crt", "--tls-cert", "/tls/tls.crt", "--tls-key", "/tls/tls.key",
            "--server-name", "epdserve-worker",
        ]  # fmt: skip


def test_the_probe_timeout_is_bounded_by_the_schema() -> None:
    with pytest.raises(Exception, match="livenessTimeoutSeconds"):
        ch.render_objects({"workers": {"probes": {"livenessTimeoutSeconds": 1}}})


def _rendered_command(files: Any, port: int) -> list[str]:
    """The rendered exec probe, pointed at this test's certificates and worker port."""
    tls = {"grpcTlsCa": files.ca, "grpcTlsCert": files.cert, "grpcTlsKey": files.key}
    values = {"workers": {"config": tls, "port": port, "probes": {"livenessTimeoutSeconds": 3}},
              "router": {"config": {"grpcTlsServerName": "epdserve-worker"}}}  # fmt: skip
    probe = next(iter(_worker_liveness(values).values()))
    return [sys.executable, *probe["exec"]["command"][1:]]


class _Engine:
    is_running = True
    stall = 0.0  # seconds without progress while it has requests

    def stalled_s(self) -> float:
        return self.stall


def _run_probe(cmd: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "POD_IP": "127.0.0.1"}  # the container's env: where the worker binds
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stderr, time.monotonic() - t0


def test_the_rendered_exec_probe_passes_on_an_answer_and_fails_on_silence(tmp_path) -> None:
    ca = TestCA(tmp_path)
    files = ca.issue("worker", "epdserve-worker")

    async def serve_and_probe(engine: _Engine) -> tuple[int, str, float]:
        server = grpc.aio.server()
        add_health(server, engine, engine_stall_s=30)
        port = add_port(server, "127.0.0.1:0", GrpcTLS(files.ca, files.cert, files.key))
        await server.start()
        try:
            return await asyncio.to_thread(_run_probe, _rendered_command(files, port))
        finally:
            await server.stop(0)

    rc, err, _ = asyncio.run(serve_and_probe(_Engine()))
    assert rc == 0, err

    # An engine stuck in a step (a rank stopped): the process answers, the probe fails.
    stuck = _Engine()
    stuck.stall = 31.0
    rc, err, _ = asyncio.run(serve_and_probe(stuck))
    assert rc == 1 and "NOT_SERVING" in err, err

    # A listener that accepts (the kernel's backlog, as for a stopped worker), never answers.
    with silent_listener() as port:
        rc, err, took = _run_probe(_rendered_command(files, port))
    assert rc == 1 and "no answer within the timeout" in err, err
    assert took < 1 + 10  # bounded by its own --timeout: 1 s, within timeoutSeconds 3
