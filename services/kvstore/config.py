"""kvstore settings: the index server, its etcd registration and the supervised master."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.member_config import MemberConfig, check_port


@dataclass
class KVStoreConfig(MemberConfig):
    """How the kvstore process listens, joins the cluster and runs `mooncake_master`."""

    INSTANCE_PREFIX = "kvstore-"

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
        self.check_member()
        for name in ("master_rpc_port", "master_metadata_port", "master_metrics_port"):
            check_port(name, getattr(self, name))
        if self.capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {self.capacity_blocks}")
        if self.master_kv_lease_ttl_ms < 1:
            raise ValueError("master_kv_lease_ttl_ms must be >= 1")
