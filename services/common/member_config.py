"""Settings every gRPC process that joins a cluster shares (a worker, the kvstore): where it
listens, its name, and its etcd registration; mutual TLS from ``GrpcTLSFiles``."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import ClassVar

from services.common.grpc_utils import GrpcTLSFiles


@dataclass
class MemberConfig(GrpcTLSFiles):
    # Prefix of the default instance id ("<prefix><host>-<pid>").
    INSTANCE_PREFIX: ClassVar[str] = ""

    host: str = field(default="127.0.0.1", metadata={"help": "gRPC listen address"})
    port: int = field(default=0, metadata={"help": "gRPC port; 0 picks a free one"})
    metrics_port: int = field(
        default=0, metadata={"help": "Prometheus /metrics HTTP port on --host; 0 picks a free one"}
    )
    advertise_host: str | None = field(
        default=None, metadata={"help": "address other processes dial; default: --host"}
    )
    instance_id: str | None = field(
        default=None, metadata={"help": "name in the cluster; default: from host name and pid"}
    )
    cluster: str = field(default="default", metadata={"help": "cluster name (etcd key prefix)"})
    etcd: str = field(
        default="127.0.0.1:2379", metadata={"help": "etcd endpoints, comma-separated host:port"}
    )
    register: bool = field(
        default=True, metadata={"help": "join the cluster in etcd (--no-register: direct use)"}
    )
    lease_ttl: int = field(default=5, metadata={"help": "etcd lease TTL in seconds"})

    def check_member(self) -> None:
        """Validate the shared settings and name the instance (call from __post_init__)."""
        for name in ("port", "metrics_port"):
            check_port(name, getattr(self, name))
        if self.lease_ttl < 2:
            raise ValueError(f"lease_ttl must be >= 2 seconds, got {self.lease_ttl}")
        check_cluster_name(self.cluster)
        if self.register and not self.etcd_endpoints:
            raise ValueError("--etcd needs at least one host:port (or pass --no-register)")
        if self.instance_id is None:
            self.instance_id = f"{self.INSTANCE_PREFIX}{socket.gethostname()}-{os.getpid()}"
        check_instance_id(self.instance_id)
        _ = self.grpc_tls  # all three TLS files or none

    @property
    def etcd_endpoints(self) -> list[str]:
        return [e.strip() for e in self.etcd.split(",") if e.strip()]


MAX_INSTANCE_ID_CHARS = 256
# The chart's values.schema.json checks clusterName with the same pattern and length.
CLUSTER_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_CLUSTER_NAME_CHARS = 128


def check_cluster_name(cluster: str) -> None:
    """A cluster name is one segment of every etcd key of the cluster (``/epdserve/<cluster>/``)
    and part of folder names (the default batch folder): a '/' would nest its keys under
    another cluster's, a '../' would leave the folder."""
    if len(cluster) > MAX_CLUSTER_NAME_CHARS or not re.fullmatch(CLUSTER_NAME_PATTERN, cluster):
        raise ValueError(f"cluster must be 1 to {MAX_CLUSTER_NAME_CHARS} letters, digits, '_', "
                         f"'.' or '-', starting with a letter or digit, got {cluster!r}")  # fmt: skip


def check_instance_id(instance_id: str) -> None:
    """An instance id is one segment of etcd keys and of the admin API's paths
    (``/admin/workers/ID/...``, percent-quoted by the CLI): no '/' (a router decodes %2F
    before it matches a route, so no path could name the worker) and nothing unprintable."""
    if not 0 < len(instance_id) <= MAX_INSTANCE_ID_CHARS:
        raise ValueError(f"instance_id must have 1 to {MAX_INSTANCE_ID_CHARS} characters")
    if "/" in instance_id or not instance_id.isprintable():
        raise ValueError(f"instance_id must be printable and hold no '/', got {instance_id!r}")


def check_port(name: str, port: int) -> None:
    if not 0 <= port < 65536:
        raise ValueError(f"{name} must be in [0, 65535], got {port}")
