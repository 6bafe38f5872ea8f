"""gRPC helpers shared by workers and routers: channel/server options, role names, timeouts."""

from __future__ import annotations

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

ROLES = ("mixed", "prefill", "decode")
_ROLE_TO_PB: dict[str, pb.Role] = {
    "mixed": pb.ROLE_MIXED, "prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE,
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


def insecure_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
