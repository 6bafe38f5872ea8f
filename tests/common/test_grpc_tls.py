"""Mutual TLS on gRPC (services/common/grpc_utils.py): a real server and real channels."""

from __future__ import annotations

import grpc
import pytest

from services.common.grpc_utils import SERVER_OPTIONS, GrpcTLS, add_port, channel
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.router.config import RouterConfig
from services.worker.config import WorkerConfig
from tests.tls_certs import TestCA

pytestmark = pytest.mark.timeout(60)


class _Health(pb_grpc.WorkerServiceServicer):
    async def Health(self, request, context):  # noqa: N802
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, instance_id="w")


@pytest.fixture
def pki(tmp_path):
    ca = TestCA(tmp_path, "ca")
    other = TestCA(tmp_path, "other-ca")
    return {
        "worker": ca.issue("worker", "127.0.0.1"),
        "named": ca.issue("named", "epdserve-worker"),
        "router": ca.issue("router", "router"),
        "stranger": other.issue("stranger", "router"),
    }


async def _serve(files) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_WorkerServiceServicer_to_server(_Health(), server)
    port = add_port(server, "127.0.0.1:0", GrpcTLS(files.ca, files.cert, files.key))
    assert port
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _health(ch: grpc.aio.Channel) -> str:
    async with ch:
        resp = await pb_grpc.WorkerServiceStub(ch).Health(pb.HealthRequest(), timeout=5)
        return resp.instance_id


@pytest.mark.asyncio
async def test_mutual_tls_works_and_peers_without_our_certificate_are_refused(pki) -> None:
    server, address = await _serve(pki["worker"])
    try:
        r = pki["router"]
        assert await _health(channel(address, GrpcTLS(r.ca, r.cert, r.key))) == "w"
        # No client certificate at all: the handshake fails.
        creds = grpc.ssl_channel_credentials(open(r.ca, "rb").read())
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _health(grpc.aio.secure_channel(address, creds))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        # A certificate from another CA.
        s = pki["stranger"]
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _health(channel(address, GrpcTLS(r.ca, s.cert, s.key)))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        # Plain gRPC to a TLS port.
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _health(channel(address))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_server_name_is_checked_instead_of_the_dialled_address(pki) -> None:
    server, address = await _serve(pki["named"])  # the certificate names no IP
    try:
        r = pki["router"]
        with pytest.raises(grpc.aio.AioRpcError):
            await _health(channel(address, GrpcTLS(r.ca, r.cert, r.key)))
        tls = GrpcTLS(r.ca, r.cert, r.key, server_name="epdserve-worker")
        assert await _health(channel(address, tls)) == "w"
    finally:
        await server.stop(None)


def test_tls_flags_come_all_three_or_none(tmp_path) -> None:
    assert GrpcTLS.from_files(None, None, None) is None
    with pytest.raises(ValueError, match="--grpc-tls-key"):
        GrpcTLS.from_files("ca.pem", "c.pem", None)
    with pytest.raises(ValueError, match="--grpc-tls-ca"):
        WorkerConfig(grpc_tls_cert="c.pem", grpc_tls_key="k.pem")
    with pytest.raises(ValueError, match="--ssl-keyfile"):
        RouterConfig(ssl_certfile="c.pem")
    cfg = RouterConfig(grpc_tls_ca="a", grpc_tls_cert="b", grpc_tls_key="c")
    assert cfg.grpc_tls == GrpcTLS("a", "b", "c") and cfg.scheme == "http"
    missing = GrpcTLS(str(tmp_path / "none.pem"), "b", "c")
    with pytest.raises(ValueError, match="cannot read a gRPC TLS file"):
        missing.server_credentials()
