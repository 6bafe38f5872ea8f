"""gRPC helpers shared by workers and routers: channel/server options, role names, timeouts,
and the one place where channels and server ports are built, plain or with mutual TLS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common.proto import worker_pb2 as pb

# Keep-alive pings notice a peer that vanished without closing its socket (a host died);
# a killed process on a live host closes its sockets and is seen at once.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Reconnect quickly after a worker restart instead of the default 20 s+ backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

UNARY_TIMEOUT_S = 5.0  # Abort, Health, SetRole, Drain

# Trailing metadata of a failed worker call that says what failed, so that a router knows
# whether another worker may take the request.
FAILURE_KEY = "epdserve-failure"
# The request failed on a healthy worker because of itself (an exception while processing
# it alone): another worker would fail the same way, or die of it. Never retried.
FAILURE_REQUEST = "request"
# The worker's engine failed (it is dying or dead): the request may go elsewhere.
FAILURE_ENGINE = "engine"
# The worker refused the request without running it (draining, changing role, stale role
# epoch): another worker may take it, and nothing failed.
FAILURE_REFUSED = "refused"
# Moving the request's KV cache failed (either side may be at fault): retried on a new pair.
FAILURE_TRANSFER = "transfer"
# The worker has no room for the request now (its KV cache is full): backpressure, nothing
# failed; retry later, on this worker or another. Sent with RESOURCE_EXHAUSTED.
FAILURE_BUSY = "busy"


def failure_metadata(kind: str) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for ``context.abort`` naming the failure ``kind``."""
    return ((FAILURE_KEY, kind),)


def failure_kind(exc: grpc.RpcError) -> str | None:
    """The failure kind a worker attached to ``exc`` (None: not said, e.g. it died)."""
    trailing = getattr(exc, "trailing_metadata", None)
    try:
        items = trailing() if callable(trailing) else None
    except Exception:  # noqa: BLE001 - a call that never got trailers
        return None
    for key, value in items or ():
        if key == FAILURE_KEY:
            return value if isinstance(value, str) else value.decode()
    return None


ROLES = ("mixed", "prefill", "decode", "encode")
_ROLE_TO_PB: dict[str, pb.Role] = {
    "mixed": pb.ROLE_MIXED, "prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE,
    "encode": pb.ROLE_ENCODE,
}  # fmt: skip
_PB_TO_ROLE: dict[int, str] = {int(v): k for k, v in _ROLE_TO_PB.items()}


def role_to_pb(role: str) -> pb.Role:
    try:
        return _ROLE_TO_PB[role]
    except KeyError:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}") from None


def role_from_pb(value: int) -> str:
    try:
        return _PB_TO_ROLE[value]
    except KeyError:
        raise ValueError(f"unknown role enum {value}") from None


def insecure_channel(
    address: str, interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None
) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)


@dataclass(frozen=True)
class GrpcTLS:
    """Mutual TLS between router and workers: both sides present a certificate signed by
    ``ca`` and check the other's against it. The worker is the server (it requires a client
    certificate), the router the client."""

    ca: str  # PEM file of the CA both sides trust
    cert: str  # PEM file of this process's certificate
    key: str  # PEM file of its private key
    # The name the workers' certificate carries, checked instead of the dialled host: in a
    # cluster workers are dialled by pod IP, which a certificate cannot list in advance.
    server_name: str | None = None

    @classmethod
    def from_files(
        cls, ca: str | None, cert: str | None, key: str | None, server_name: str | None = None
    ) -> GrpcTLS | None:
        """None when no file is given (plain gRPC); ValueError when only some are."""
        given = {"ca": ca, "cert": cert, "key": key}
        if not any(given.values()):
            return None
        missing = [name for name, path in given.items() if not path]
        if missing:
            raise ValueError(
                "gRPC mutual TLS needs --grpc-tls-ca, --grpc-tls-cert and --grpc-tls-key "
                f"together; missing: {', '.join('--grpc-tls-' + m for m in missing)}"
            )
        return cls(ca or "", cert or "", key or "", server_name)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return tuple(Path(p).read_bytes() for p in (self.ca, self.cert, self.key))  # type: ignore[return-value]
        except OSError as exc:
            raise ValueError(f"cannot read a gRPC TLS file: {exc}") from exc

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)

    def server_credentials(self) -> grpc.ServerCredentials:
        ca, cert, key = self._read()
        # NOTE: require_client_auth: a peer without a certificate from our CA is refused in
        # the TLS handshake, before any RPC reaches the servicer.
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )


@dataclass
class GrpcTLSFiles:
    """The mutual-TLS flags of a gRPC server process (a worker, the kvstore); a base class
    of its config."""

    grpc_tls_ca: str | None = field(
        default=None,
        metadata={"help": "mutual TLS on gRPC: CA file; clients need a certificate it signed"},
    )
    grpc_tls_cert: str | None = field(
        default=None, metadata={"help": "mutual TLS on gRPC: this process's certificate file"}
    )
    grpc_tls_key: str | None = field(
        default=None, metadata={"help": "mutual TLS on gRPC: this process's private key file"}
    )
    grpc_tls_server_name: str | None = field(
        default=None,
        metadata={"help": "mutual TLS on gRPC: name in the certificates of the servers this "
                          "process calls (the kvstore), checked instead of the dialled address"},
    )  # fmt: skip

    @property
    def grpc_tls(self) -> GrpcTLS | None:
        """Mutual TLS of its gRPC port and of its own calls; None: plain gRPC."""
        return GrpcTLS.from_files(
            self.grpc_tls_ca, self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_server_name
        )


def channel(
    address: str,
    tls: GrpcTLS | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A channel to a worker: plain, or mutual TLS when ``tls`` is given."""
    if tls is None:
        return insecure_channel(address, interceptors)
    options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=options, interceptors=interceptors
    )


def add_port(server: grpc.aio.Server, address: str, tls: GrpcTLS | None = None) -> int:
    """Bind ``address`` (plain, or mutual TLS); returns the port (0: could not bind)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())
