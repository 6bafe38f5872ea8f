"""kvstore settings: the index server, its etcd registration and the supervised master."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from services.common.grpc_utils import GrpcTLSFiles


def _check_port(name: str, port: int) -> None:
    if not 0 <= port < 65536:
        raise ValueError(f"{name} must be in [0, 65535], got {port}")


@dataclass
class KVStoreConfig(GrpcTLSFiles):
    """How the kvstore process listens, joins the cluster and runs `mooncake_master`."""

    host: str = field(default="127.0.0.1", metadata={"help": "gRPC listen address"})
    port: int = field(default=0, metadata={"help": "gRPC port; 0 picks a free one"})
    metrics_port: int = field(
        default=0, metadata={"help": "Prometheus /metrics HTTP port on --host; 0 picks a free one"}
    )
    advertise_host: str | None = field(
        default=None, metadata={"help": "address other processes dial; default: --host"}
    )
    instance_id: str | None = field(
        default=None, metadata={"help": "name in the cluster; default: kvstore-<host>-<pid>"}
    )
    cluster: str = field(default="default", metadata={"help": "cluster name (etcd key prefix)"})
    etcd: str = field(
        default="127.0.0.1:2379", metadata={"help": "etcd endpoints, comma-separated host:port"}
    )
    register: bool = field(
        default=True, metadata={"help": "join the cluster in etcd (--no-register: direct use)"}
    )
    lease_ttl: int = field(default=5, metadata={"help": "etcd lease TTL in seconds"})
    capacity_blocks: int = field(
        default=1_000_000,
        metadata={"help": "index entries kept (least recently used dropped first)"},
    )
    master: bool = field(
        default=True,
        metadata={"help": "start and supervise mooncake_master (--no-master: index only)"},
    )
    master_binary: str = field(
        default="mooncake_master", metadata={"help": "the master executable (name or path)"}
    )
    master_host: str = field(
        default="127.0.0.1",
        metadata={"help": "address the master binds and advertises (its defaults are 0.0.0.0)"},
    )
    master_rpc_port: int = field(
        default=0, metadata={"help": "master RPC port; 0 picks a free one (kept on restarts)"}
    )
    master_metadata_port: int = field(
        default=0, metadata={"help": "master HTTP metadata server port; 0 picks a free one"}
    )
    master_metrics_port: int = field(
        default=0, metadata={"help": "master Prometheus metrics port; 0 picks a free one"}
    )
    master_kv_lease_ttl_ms: int = field(
        default=5000, metadata={"help": "master's lease on a stored object while it is read"}
    )
    master_args: list[str] = field(
        default_factory=list,
        metadata={
            "help": "further mooncake_master flags without their leading --, e.g. "
            "eviction_high_watermark_ratio=0.9 (a dash would read as a kvstore flag)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "master_rpc_port", "master_metadata_port",
                     "master_metrics_port"):  # fmt: skip
            _check_port(name, getattr(self, name))
        if self.lease_ttl < 2:
            raise ValueError(f"lease_ttl must be >= 2 seconds, got {self.lease_ttl}")
        _ = self.grpc_tls  # all three TLS files or none
        if self.capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {self.capacity_blocks}")
        if self.master_kv_lease_ttl_ms < 1:
            raise ValueError("master_kv_lease_ttl_ms must be >= 1")
        if self.register and not self.etcd_endpoints:
            raise ValueError("--etcd needs at least one host:port (or pass --no-register)")
        if self.instance_id is None:
            self.instance_id = f"kvstore-{socket.gethostname()}-{os.getpid()}"

    @property
    def etcd_endpoints(self) -> list[str]:
        return [e.strip() for e in self.etcd.split(",") if e.strip()]
