"""TLS for the bundled etcd (etcd.bundled.tls): the members' flags, probes and mounts and every
etcd client's endpoint, environment and mounts as Helm renders them; then a real three-member
etcd started with exactly the rendered flags (local ports and paths substituted), reached by the
project's etcd client with exactly the environment the chart gives the router, workers and
kvstore."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.deps import HELM, require

require("helm_python", HELM)

import chart_helpers as ch  # noqa: E402

from services.common import etcd_client  # noqa: E402
from services.common.etcd_client import EtcdAccess, connect_etcd  # noqa: E402
from services.common.etcd_server import find_etcd_binary  # noqa: E402
from services.common.net import free_port  # noqa: E402
from services.router.rebalance.role_store import RoleStore, RoleStoreError  # noqa: E402
from tests.tls_certs import TestCA  # noqa: E402

pytestmark = pytest.mark.timeout(180)

SERVER_SECRET = "etcd-server"
CLIENT_SECRET = "etcd-client"
MEMBERS = 3
SERVICE = f"{ch.FULLNAME}-etcd"  # the client Service every etcd client dials
PEERS = f"{ch.FULLNAME}-etcd-peers"  # the headless Service naming each member
# The SANs values.yaml and the chart README ask of the members' certificate.
SERVER_SANS = (
    SERVICE,
    f"{SERVICE}.{ch.NAMESPACE}.svc",
    f"{SERVICE}.{ch.NAMESPACE}.svc.cluster.local",
    f"*.{PEERS}.{ch.NAMESPACE}.svc",
    f"*.{PEERS}.{ch.NAMESPACE}.svc.cluster.local",
)
TLS = {"enabled": True, "secretName": SERVER_SECRET, "clientSecretName": CLIENT_SECRET}
VALUES: dict[str, Any] = {
    "etcd": {"bundled": {"replicas": MEMBERS, "tls": TLS}},
    "kvstore": {"enabled": True},
    "workers": {
        "mixed": {"enabled": False},
        "prefill": {"enabled": True},
        "decode": {"enabled": True},
    },
}
# Without clientSecretName the clients use the members' Secret.
SHARED_SECRET = ch.merge_overlays(VALUES, {"etcd": {"bundled": {"tls": {"clientSecretName": ""}}}})
ETCD_ENV = ("EPDSERVE_ETCD_CACERT", "EPDSERVE_ETCD_CERT", "EPDSERVE_ETCD_KEY")


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    return container


def _statefulset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (sts,) = [o for o in objects if o["kind"] == "StatefulSet"]
    return sts


def _flags(command: list[str]) -> dict[str, str]:
    """`--flag=value` (or a bare `--flag`: "true") of the etcd command line."""
    out = {}
    for arg in command[1:]:
        name, _, value = arg.partition("=")
        out[name] = value or "true"
    return out


def _clients(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every workload whose container talks to etcd (`--etcd` on its command line)."""
    return {
        o["metadata"]["name"]: o
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet") and "--etcd" in _container(o)["command"]
    }


def _mounts(obj: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """volume name -> (mount path, volume) of a workload's container."""
    spec = obj["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {c["metadata"]["name"]: c for c in obj["spec"].get("volumeClaimTemplates", [])}
    return {
        m["name"]: (m["mountPath"], volumes.get(m["name"]) or claims[m["name"]])
        for m in _container(obj).get("volumeMounts", [])
    }


# --- what the chart renders -----------------------------------------------------------------


def test_members_serve_https_with_client_and_peer_certificates() -> None:
    sts = _statefulset(ch.render_objects(VALUES))
    container = _container(sts)
    flags = _flags(container["command"])
    urls = [
        flags[f]
        for f in (
            "--listen-client-urls",
            "--advertise-client-urls",
            "--listen-peer-urls",
            "--initial-advertise-peer-urls",
        )
    ]
    urls += [m.split("=", 1)[1] for m in flags["--initial-cluster"].split(",")]
    assert len(urls) == 4 + MEMBERS and all(u.startswith("https://") for u in urls), urls
    tls_dir, volume = _mounts(sts)["tls"]
    assert volume["secret"]["secretName"] == SERVER_SECRET
    for flag, file in [
        ("--cert-file", "tls.crt"),
        ("--key-file", "tls.key"),
        ("--trusted-ca-file", "ca.crt"),
    ]:
        assert flags[flag] == f"{tls_dir}/{file}"
        assert flags[flag.replace("--", "--peer-", 1)] == f"{tls_dir}/{file}"
    assert flags["--client-cert-auth"] == flags["--peer-client-cert-auth"] == "true"
    # The kubelet has no client certificate: readiness asks the plain health listener.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert flags["--listen-metrics-urls"] == f"http://0.0.0.0:{ports['health']}"
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "health"}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "client"}
    # The other keys of the Secret are not listed: every file of it is mounted.
    assert "items" not in volume["secret"]


@pytest.mark.parametrize(
    "values,secret", [(VALUES, CLIENT_SECRET), (SHARED_SECRET, SERVER_SECRET)], ids=["own", "same"]
)
def test_every_etcd_client_gets_the_client_certificate(values: dict[str, Any], secret: str) -> None:
    clients = _clients(ch.render_objects(values))
    names = {f"{ch.FULLNAME}-{c}" for c in ("router", "kvstore", "worker-prefill", "worker-decode")}
    assert set(clients) == names
    for name, obj in clients.items():
        container = _container(obj)
        command = container["command"]
        assert command[command.index("--etcd") + 1] == f"{SERVICE}:2379", name
        mount_path, volume = _mounts(obj)["etcd-tls"]
        assert volume == {"name": "etcd-tls", "secret": {"secretName": secret}}, name
        assert {"name": "etcd-tls", "mountPath": mount_path, "readOnly": True} in (
            container["volumeMounts"]
        )
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert [env.get(k) for k in ETCD_ENV] == [
            f"{mount_path}/ca.crt",
            f"{mount_path}/tls.crt",
            f"{mount_path}/tls.key",
        ], name
        assert "EPDSERVE_ETCD_USER" not in env  # auth belongs to etcd.external


def test_tls_off_keeps_plain_etcd() -> None:
    objects = ch.render_objects({"kvstore": {"enabled": True}})
    container = _container(_statefulset(objects))
    assert not [a for a in container["command"] if "https" in a or "cert" in a or "metrics" in a]
    assert container["readinessProbe"]["httpGet"]["port"] == "client"
    for obj in _clients(objects).values():
        assert "etcd-tls" not in _mounts(obj)
        assert not {e["name"] for e in _container(obj)["env"]} & set(ETCD_ENV)


@pytest.mark.parametrize(
    "tls,message",
    [
        ({"enabled": True}, "etcd.bundled.tls.secretName"),
        ({**TLS, "healthPort": 2379}, "etcd.bundled.tls.healthPort"),
        ({**TLS, "peer": True}, "peer"),  # peers always use the members' Secret
    ],
    ids=["no secret", "health on the client port", "unknown key"],
)
def test_bad_tls_values_fail_with_a_clear_message(tls: dict[str, Any], message: str) -> None:
    helm = ch.helm()
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as err:
        ch.render({"etcd": {"bundled": {"tls": tls}}})
    assert message in str(err.value)


# --- the rendered configuration, run ----------------------------------------------------------


def _write_secret(folder: Path, ca: TestCA, name: str, *identities: str) -> Path:
    """A kubernetes.io/tls Secret with ca.crt, as its volume shows it: one file per key."""
    files = ca.issue(name, *identities)
    secret = folder / "secrets" / name
    secret.mkdir(parents=True)
    shutil.copy(files.ca, secret / "ca.crt")
    shutil.copy(files.cert, secret / "tls.crt")
    shutil.copy(files.key, secret / "tls.key")
    return secret


class RenderedEtcd:
    """The rendered StatefulSet's members as local processes: pod i is `<fullname>-etcd-i`,
    each container port gets a free loopback port, each volume a local folder."""

    def __init__(self, sts: dict[str, Any], secrets: dict[str, Path], folder: Path) -> None:
        self.container = _container(sts)
        self.container_ports = {p["containerPort"]: p["name"] for p in self.container["ports"]}
        self.ports = [
            {name: free_port() for name in self.container_ports.values()} for _ in range(MEMBERS)
        ]
        self.mounts = _mounts(sts)
        self.secrets = secrets
        self.folder = folder
        self.procs: list[subprocess.Popen[bytes]] = []

    def member_argv(self, i: int) -> list[str]:
        """The container's command for pod i, only ports, host names and paths made local."""

        def url(match: re.Match[str]) -> str:
            scheme, host, port = match.groups()
            member = re.fullmatch(rf"{ch.FULLNAME}-etcd-(\d+)\.{PEERS}\.{ch.NAMESPACE}\.svc", host)
            assert member or host == "0.0.0.0", host
            j = int(member.group(1)) if member else i
            return f"{scheme}://127.0.0.1:{self.ports[j][self.container_ports[int(port)]]}"

        argv = []
        for arg in self.container["command"][1:]:
            arg = arg.replace("$(POD_NAME)", f"{ch.FULLNAME}-etcd-{i}")
            arg = re.sub(r"(https?)://([^:/,]+):(\d+)", url, arg)
            for name, (path, volume) in self.mounts.items():
                if "secret" in volume:
                    local = self.secrets[volume["secret"]["secretName"]]
                else:
                    local = self.folder / f"member-{i}" / name
                arg = arg.replace(path, str(local))
            assert not re.search(r"\$\(|\.svc|0\.0\.0\.0|/etc/|/var/", arg), arg
            argv.append(arg)
        return [find_etcd_binary(), *argv]

    def start(self) -> None:
        for i in range(MEMBERS):
            log = open(self.folder / f"member-{i}.log", "wb")  # noqa: SIM115 - the child's
            self.procs.append(
                subprocess.Popen(self.member_argv(i), stdout=log, stderr=subprocess.STDOUT)
            )
            log.close()

    def ready(self, i: int) -> bool:
        """The rendered readiness probe, asked of member i."""
        probe = self.container["readinessProbe"]["httpGet"]
        url = f"http://127.0.0.1:{self.ports[i][probe['port']]}{probe['path']}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return resp.status == 200 and b'"true"' in resp.read()
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.ready(i) for i in range(MEMBERS)):
            for i, proc in enumerate(self.procs):
                log = (self.folder / f"member-{i}.log").read_text(errors="replace")[-3000:]
                assert proc.poll() is None, f"member {i} exited:\n{log}"
            assert time.monotonic() < deadline, "members not ready"
            time.sleep(0.2)

    def stop(self) -> None:
        # NOTE: one member at a time: terminated together, each one's graceful stop waited
        # on peers that were leaving too (7 s in all, 2 s like this).
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("etcd-tls")
    ca = TestCA(folder)
    # NOTE: locally the members reach each other at 127.0.0.1, not at their DNS names.
    secrets = {
        SERVER_SECRET: _write_secret(folder, ca, SERVER_SECRET, *SERVER_SANS, "127.0.0.1"),
        CLIENT_SECRET: _write_secret(folder, ca, CLIENT_SECRET, "epdserve"),
    }
    sts = _statefulset(ch.render_objects(VALUES))
    assert _statefulset(ch.render_objects(SHARED_SECRET)) == sts
    etcd = RenderedEtcd(sts, secrets, folder)
    etcd.start()
    try:
        etcd.wait_ready()
        yield etcd
    finally:
        etcd.stop()


def _https(url: str, secret: Path | None, cert: bool = True) -> bytes:
    ctx = ssl.create_default_context(cafile=str(secret / "ca.crt")) if secret else None
    if ctx and cert:
        ctx.load_cert_chain(str(secret / "tls.crt"), str(secret / "tls.key"))
    with urllib.request.urlopen(url, timeout=3.0, context=ctx) as resp:
        return bytes(resp.read())


def test_members_form_a_cluster_over_peer_tls(cluster: RenderedEtcd) -> None:
    # Every member is ready: a leader was elected over https between them.
    server = cluster.secrets[SERVER_SECRET]
    peer = f"https://127.0.0.1:{cluster.ports[1]['peer']}/members"
    assert b"https://" in _https(peer, server)
    with pytest.raises(OSError):  # no client certificate: refused
        _https(peer, server, cert=False)
    client = f"https://127.0.0.1:{cluster.ports[0]['client']}/health"
    with pytest.raises(OSError):
        _https(client, server, cert=False)
    with pytest.raises(OSError):  # plain http is not served
        _https(client.replace("https", "http"), None)


@pytest.mark.asyncio
@pytest.mark.parametrize("values", [VALUES, SHARED_SECRET], ids=["own", "same"])
async def test_every_client_reaches_etcd_with_the_charts_environment(
    cluster: RenderedEtcd, values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    service_ports = [f"127.0.0.1:{p['client']}" for p in cluster.ports]
    real_resolve = etcd_client.resolve_endpoints

    async def cluster_dns(endpoints: list[str]) -> tuple[list[str], str | None]:
        # The client Service resolves to the members; the name is kept for TLS, as in a pod.
        if endpoints == [f"{SERVICE}:2379"]:
            return service_ports, SERVICE
        return await real_resolve(endpoints)

    monkeypatch.setattr(etcd_client, "resolve_endpoints", cluster_dns)
    for name, obj in _clients(ch.render_objects(values)).items():
        container = _container(obj)
        mount_path, volume = _mounts(obj)["etcd-tls"]
        secret = str(cluster.secrets[volume["secret"]["secretName"]])
        for e in container["env"]:
            if e["name"].startswith("EPDSERVE_ETCD_"):
                monkeypatch.setenv(e["name"], e["value"].replace(mount_path, secret))
        command = container["command"]
        store = RoleStore(command[command.index("--etcd") + 1].split(","), "tls")
        await store.set(name, "decode")
        assert (await store.all())[name] == "decode"
        await store.close()

    # Without the client certificate, or without TLS, etcd refuses the same client.
    ca = str(cluster.secrets[CLIENT_SECRET] / "ca.crt")
    for access in (EtcdAccess(ca=ca), EtcdAccess()):
        with pytest.raises(Exception):  # noqa: B017 - handshake or unavailable errors
            client = await asyncio.wait_for(connect_etcd([f"{SERVICE}:2379"], access), 5)
            try:
                assert client.kv is not None
                await client.kv.put("/epdserve/tls/x", "y", timeout=3)
            finally:
                await client.close()
    monkeypatch.delenv("EPDSERVE_ETCD_CERT")
    monkeypatch.delenv("EPDSERVE_ETCD_KEY")
    with pytest.raises(RoleStoreError):
        await RoleStore([f"{SERVICE}:2379"], "tls").all()
