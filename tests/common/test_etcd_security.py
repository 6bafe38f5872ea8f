"""etcd with TLS, client certificates and password auth: membership, leader election and the
desired-role store reach it through the EPDSERVE_ETCD_* environment, and nothing else does."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.common.etcd_client import EtcdAccess, connect_etcd, resolve_endpoints
from services.common.etcd_server import EtcdSecurity, EtcdServer
from services.common.membership import InstanceInfo, MembershipWatcher, Registrar
from services.router.rebalance.leader import LeaderElection
from services.router.rebalance.role_store import RoleStore, RoleStoreError
from tests.tls_certs import TestCA
from tests.waits import until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("etcd-pki")
    ca = TestCA(folder)
    server = ca.issue("etcd", "127.0.0.1", "localhost")
    client = ca.issue("client", "client")
    security = EtcdSecurity(
        ca=ca.ca_file, cert=server.cert, key=server.key,
        client_cert=(client.cert, client.key), user=("epdserve", "s3cret"),
    )  # fmt: skip
    with EtcdServer(security=security) as etcd:
        yield etcd


@pytest.fixture
def etcd_env(secure_etcd, monkeypatch):
    for key, value in secure_etcd.access.to_env().items():
        monkeypatch.setenv(key, value)
    return secure_etcd


def _info(iid: str) -> InstanceInfo:
    return InstanceInfo(
        id=iid, address="127.0.0.1:1", role="mixed", role_epoch=1, model="m",
        incarnation="inc-" + iid, pid=os.getpid(), host="h",
    )  # fmt: skip


def test_access_from_env_checks_itself() -> None:
    env = {"EPDSERVE_ETCD_CACERT": "ca", "EPDSERVE_ETCD_USER": "u", "EPDSERVE_ETCD_PASSWORD": "p"}
    access = EtcdAccess.from_env(env)
    assert access == EtcdAccess(ca="ca", user="u", password="p")
    assert "password" not in repr(access)  # never shown in logs
    assert EtcdAccess.from_env({}) == EtcdAccess()
    with pytest.raises(ValueError, match="EPDSERVE_ETCD_PASSWORD"):
        EtcdAccess.from_env({"EPDSERVE_ETCD_USER": "u"})
    with pytest.raises(ValueError, match="EPDSERVE_ETCD_CACERT"):
        EtcdAccess(cert="c", key="k")


@pytest.mark.asyncio
async def test_host_names_are_resolved_for_etcd3aios_address_only_target() -> None:
    # etcd3aio dials "ipv4:<endpoints>", which refuses names such as a Service's.
    eps, name = await resolve_endpoints(["localhost:2379", "10.0.0.7:2379", "localhost:2379"])
    assert eps == ["127.0.0.1:2379", "10.0.0.7:2379"] and name == "localhost"
    assert await resolve_endpoints(["127.0.0.1:1"]) == (["127.0.0.1:1"], None)
    with pytest.raises(ValueError, match="not host:port"):
        await resolve_endpoints(["etcd"])


@pytest.mark.asyncio
async def test_worker_registers_and_router_sees_it_over_tls_with_auth(etcd_env) -> None:
    ep = etcd_env.endpoint
    watcher = MembershipWatcher([ep], "sec")
    reg = Registrar([ep], "sec", _info("w1"), ttl=2)
    await watcher.start()
    await reg.start()
    try:
        await until(lambda: "w1" in watcher.instances, timeout=20)
        reg.update(role="prefill")
        await until(lambda: watcher.instances["w1"].role == "prefill", timeout=20)
        await reg.stop(deregister=True)
        await until(lambda: "w1" not in watcher.instances, timeout=20)
    finally:
        await reg.stop()
        await watcher.stop()


@pytest.mark.asyncio
async def test_clients_authenticate_again_after_an_etcd_restart(etcd_env) -> None:
    # etcd forgets its auth tokens when it restarts: the watch and the registration must
    # come back with fresh ones.
    ep = etcd_env.endpoint
    watcher = MembershipWatcher([ep], "restart")
    reg = Registrar([ep], "restart", _info("w2"), ttl=2)
    await watcher.start()
    await reg.start()
    try:
        await until(lambda: "w2" in watcher.instances, timeout=20)
        await asyncio.to_thread(etcd_env.restart)
        reg.update(role="decode")
        await until(lambda: watcher.instances.get("w2", _info("x")).role == "decode", 40)
    finally:
        await reg.stop()
        await watcher.stop()


@pytest.mark.asyncio
async def test_leader_and_roles_over_tls_with_auth_and_a_host_name(etcd_env) -> None:
    # "localhost" is resolved by connect_etcd and checked against the certificate's name.
    ep = f"localhost:{etcd_env.client_port}"
    leader = LeaderElection([ep], "sec", "router-a", ttl=2)
    await leader.start()
    try:
        await until(lambda: leader.is_leader, timeout=20)
        store = RoleStore([ep], "sec")
        await store.set("w1", "decode")
        assert await store.all() == {"w1": "decode"}
        await store.close()
    finally:
        await leader.stop()


@pytest.mark.asyncio
async def test_clients_without_credentials_are_refused(secure_etcd) -> None:
    ep = secure_etcd.endpoint
    access = secure_etcd.access
    no_user = EtcdAccess(ca=access.ca, cert=access.cert, key=access.key)
    wrong = EtcdAccess(
        ca=access.ca, cert=access.cert, key=access.key, user=access.user, password="wrong"
    )
    no_cert = EtcdAccess(ca=access.ca, user=access.user, password=access.password)
    for bad in (no_user, wrong, no_cert, EtcdAccess()):
        with pytest.raises(Exception):  # noqa: B017 - permission, auth or handshake errors
            client = await connect_etcd([ep], bad)
            try:
                assert client.kv is not None
                await client.kv.put("/epdserve/sec/x", "y", timeout=3)
            finally:
                await client.close()
    # A RoleStore without the environment answers its own clear error.
    with pytest.raises(RoleStoreError, match="etcd unavailable"):
        await RoleStore([ep], "sec").all()
