"""The one way processes open an etcd client: endpoints, plus TLS and user/password when the
``EPDSERVE_ETCD_*`` environment asks for them (the Helm chart sets it from a Secret).

Every etcd user (membership, leader election, desired roles) calls ``connect_etcd`` instead of
building an ``Etcd3Client`` itself, so a secured etcd needs no change anywhere else.

etcd3aio dials an ``ipv4:`` target, which takes addresses only: host names (a Kubernetes
Service such as ``release-etcd:2379``) are resolved here at each connect, and the name is
kept for TLS verification. Callers reconnect after any failure, so a moved Service is
followed. With a user, the client authenticates once per connect; a token that etcd forgot
(after a restart) fails a call, and the caller's reconnect authenticates again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from etcd3aio import Etcd3Client

T = TypeVar("T")

ETCD_OP_TIMEOUT_S = 3.0  # every etcd call is bounded: an outage must not hang a process

# Environment read by every process that talks to etcd (names fixed by the Helm chart).
ENV_CACERT = "EPDSERVE_ETCD_CACERT"  # CA that signed etcd's server certificate: turns TLS on
ENV_CERT = "EPDSERVE_ETCD_CERT"  # client certificate (etcd --client-cert-auth)
ENV_KEY = "EPDSERVE_ETCD_KEY"
ENV_USER = "EPDSERVE_ETCD_USER"  # etcd user (etcd auth enabled)
ENV_PASSWORD = "EPDSERVE_ETCD_PASSWORD"


@dataclass(frozen=True)
class EtcdAccess:
    """TLS files and credentials for etcd; all empty: plain, unauthenticated etcd."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # NOTE: never logged

    def __post_init__(self) -> None:
        if (self.cert or self.key) and not (self.cert and self.key and self.ca):
            raise ValueError(
                f"an etcd client certificate needs {ENV_CACERT}, {ENV_CERT} and {ENV_KEY}"
            )
        if self.user and self.password is None:
            raise ValueError(f"{ENV_USER} is set without {ENV_PASSWORD}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EtcdAccess:
        env = os.environ if env is None else env
        return cls(
            ca=env.get(ENV_CACERT) or None,
            cert=env.get(ENV_CERT) or None,
            key=env.get(ENV_KEY) or None,
            user=env.get(ENV_USER) or None,
            password=env.get(ENV_PASSWORD),
        )

    def to_env(self) -> dict[str, str]:
        """The inverse of ``from_env``: what a child process needs to reach the same etcd."""
        values = {
            ENV_CACERT: self.ca, ENV_CERT: self.cert, ENV_KEY: self.key,
            ENV_USER: self.user, ENV_PASSWORD: self.password,
        }  # fmt: skip
        return {k: v for k, v in values.items() if v is not None}

    def tls_files(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, client certificate chain, client key) as PEM bytes; no CA: plain gRPC."""
        try:
            return tuple(
                Path(p).read_bytes() if p else None for p in (self.ca, self.cert, self.key)
            )  # type: ignore[return-value]
        except OSError as exc:
            raise ValueError(f"cannot read an etcd TLS file: {exc}") from exc


async def resolve_endpoints(endpoints: list[str]) -> tuple[list[str], str | None]:
    """(``ip:port`` endpoints, the first host name seen or None)."""
    loop = asyncio.get_running_loop()
    out: list[str] = []
    name: str | None = None
    for ep in endpoints:
        host, sep, port = ep.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"etcd endpoint {ep!r} is not host:port")
        try:
            ipaddress.ip_address(host)
            out.append(ep)
            continue
        except ValueError:
            pass
        name = name or host
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM),
            ETCD_OP_TIMEOUT_S,
        )
        out.extend(f"{addr[0]}:{port}" for *_, addr in infos)
    return list(dict.fromkeys(out)), name


async def connect_etcd(endpoints: list[str], access: EtcdAccess | None = None) -> Etcd3Client:
    """A connected client (authenticated when ``access`` names a user); the caller closes it.

    ``access`` defaults to the ``EPDSERVE_ETCD_*`` environment."""
    access = EtcdAccess.from_env() if access is None else access
    resolved, name = await resolve_endpoints(endpoints)
    ca, chain, key = access.tls_files()
    # NOTE: a certificate names the host that was asked for, not the address it resolved to.
    client = Etcd3Client(
        resolved, rpc_max_attempts=1, tls_server_name=name if ca else None,
        ca_cert=ca, cert_chain=chain, cert_key=key,
    )  # fmt: skip
    await client.connect()
    if access.user:
        assert client.auth is not None
        try:
            resp = await client.auth.authenticate(
                access.user, access.password or "", timeout=ETCD_OP_TIMEOUT_S
            )
        except BaseException:
            await client.close()
            raise
        client.set_token(resp.token)
    return client


class EtcdSession:
    """One etcd client kept and reused by a process's occasional calls (desired roles, stored
    responses): a call that fails drops it, the next one connects again, and every call is
    bounded by a timeout, so a process keeps serving while etcd is away."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints
        self._client: Etcd3Client | None = None
        self._lock = asyncio.Lock()  # one connect at a time

    async def call(self, fn: Callable[[Etcd3Client], Awaitable[T]]) -> T:
        """``fn(client)``, or the exception that ended it (the client is then dropped)."""
        try:
            async with self._lock:
                if self._client is None:
                    self._client = await asyncio.wait_for(
                        connect_etcd(self.endpoints), ETCD_OP_TIMEOUT_S + 1
                    )
                client = self._client
            return await asyncio.wait_for(fn(client), ETCD_OP_TIMEOUT_S + 1)
        except asyncio.CancelledError:
            raise
        except Exception:
            await self.close()
            raise

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - closing a broken client
                pass
