"""A cluster secured end to end: the gateway over HTTPS, mutual TLS between router and worker,
etcd over TLS with client certificates and password auth. Real processes."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
import httpx
import pytest
from cluster_helpers import TINY_NAME, start_cluster

from services.common.etcd_server import EtcdSecurity
from services.common.grpc_utils import GrpcTLS, channel
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from tests.tls_certs import TestCA

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module")
def secured(tiny_model_dir, tmp_path_factory):
    pki = TestCA(tmp_path_factory.mktemp("pki"))
    gateway = pki.issue("gateway", "127.0.0.1")
    # Workers and the kvstore are dialled by address; their certificates carry a name instead
    # (as with pod IPs in Kubernetes), which their callers check.
    worker = pki.issue("worker", "epdserve-worker")
    kvstore = pki.issue("kvstore", "epdserve-worker")
    router = pki.issue("router", "epdserve-router")
    etcd_server = pki.issue("etcd", "127.0.0.1")
    etcd_client = pki.issue("etcd-client", "epdserve")
    grpc_tls = {"grpc_tls_ca": pki.ca_file}
    c = start_cluster(
        tiny_model_dir("llama"),
        etcd_security=EtcdSecurity(
            ca=pki.ca_file, cert=etcd_server.cert, key=etcd_server.key,
            client_cert=(etcd_client.cert, etcd_client.key), user=("epdserve", "pw-123"),
        ),
        gateway_ca=pki.ca_file,
        router_overrides={
            "ssl_certfile": gateway.cert, "ssl_keyfile": gateway.key, **grpc_tls,
            "grpc_tls_cert": router.cert, "grpc_tls_key": router.key,
            "grpc_tls_server_name": "epdserve-worker",
        },
        worker_overrides={**grpc_tls, "grpc_tls_cert": worker.cert, "grpc_tls_key": worker.key,
                          "grpc_tls_server_name": "epdserve-worker"},
        kvstore=True,
        kvstore_overrides={**grpc_tls, "grpc_tls_cert": kvstore.cert, "grpc_tls_key": kvstore.key},
    )  # fmt: skip
    yield c, pki, router
    c.stop()


def test_gateway_serves_https_with_the_ca(secured) -> None:
    cluster, pki, _ = secured
    assert cluster.base_url.startswith("https://127.0.0.1:")
    verify = ssl.create_default_context(cafile=pki.ca_file)
    with httpx.Client(base_url=cluster.base_url, verify=verify, timeout=60) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"model": TINY_NAME, "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
    # Without the CA the certificate is not trusted; plain HTTP is not spoken.
    with pytest.raises(httpx.ConnectError):
        httpx.get(cluster.base_url + "/health", timeout=10)
    with pytest.raises(httpx.HTTPError):
        httpx.get(cluster.base_url.replace("https://", "http://") + "/health", timeout=10)


def test_operator_cli_over_https(secured) -> None:
    cluster, pki, _ = secured
    env = {**os.environ, "SSL_CERT_FILE": pki.ca_file}
    st = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "status", "--json",
         "--router", cluster.base_url, "--admin-token", cluster.admin_token],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert st.returncode == 0, st.stderr
    (worker,) = json.loads(st.stdout)["workers"]
    # The router found the worker through the secured etcd and reaches it over mTLS.
    assert worker["id"] == "worker-0" and worker["state"] == "serving"
    assert worker["pid"] == cluster.workers[0].proc.pid


def test_worker_grpc_refuses_callers_without_a_client_certificate(secured) -> None:
    cluster, pki, router = secured
    address = cluster.workers[0].ready_field("address")

    async def health(make: Callable[[], grpc.aio.Channel]) -> str:
        async with make() as ch:  # made inside the event loop that uses it
            stub = pb_grpc.WorkerServiceStub(ch)
            return (await stub.Health(pb.HealthRequest(), timeout=10)).instance_id

    tls = GrpcTLS(pki.ca_file, router.cert, router.key, server_name="epdserve-worker")
    assert asyncio.run(health(lambda: channel(address, tls))) == "worker-0"
    no_cert = grpc.ssl_channel_credentials(open(pki.ca_file, "rb").read())
    override = [("grpc.ssl_target_name_override", "epdserve-worker")]
    for make in (
        lambda: channel(address),
        lambda: grpc.aio.secure_channel(address, no_cert, options=override),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            asyncio.run(health(make))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_kvstore_serves_mtls_only(secured) -> None:
    """The worker publishes its KV blocks to the kvstore over mTLS (the index knows it); a
    caller without a client certificate is refused."""
    from services.common.proto import kvstore_pb2 as kpb
    from services.common.proto import kvstore_pb2_grpc as kpb_grpc

    cluster, pki, router = secured
    assert cluster.kvstore is not None
    address = cluster.kvstore.ready_field("address")

    async def instances(make: Callable[[], grpc.aio.Channel]) -> int:
        async with make() as ch:
            stub = kpb_grpc.KVIndexServiceStub(ch)
            return (await stub.Stats(kpb.KVStoreStatsRequest(), timeout=10)).num_instances

    tls = GrpcTLS(pki.ca_file, router.cert, router.key, server_name="epdserve-worker")
    deadline = time.monotonic() + 60
    while asyncio.run(instances(lambda: channel(address, tls))) < 1:
        assert time.monotonic() < deadline, "the worker never published to the kvstore"
        time.sleep(0.5)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        asyncio.run(instances(lambda: channel(address)))
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
