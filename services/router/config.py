"""Router settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.router.policies.factory import available_policies


@dataclass
class RouterConfig:
    """How the router listens, finds workers and routes requests."""

    host: str = field(default="127.0.0.1", metadata={"help": "HTTP listen address"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    cluster: str = field(default="default", metadata={"help": "cluster name (etcd key prefix)"})
    etcd: str = field(
        default="127.0.0.1:2379", metadata={"help": "etcd endpoints, comma-separated host:port"}
    )
    model: str | None = field(
        default=None,
        metadata={"help": "model folder or .gguf the tokenizer comes from; default: embedded"},
    )
    policy: str = field(
        default="least_load",
        metadata={"help": f"routing policy: {', '.join(available_policies())}"},
    )
    request_timeout_s: float = field(
        default=600.0, metadata={"help": "deadline of one generation on a worker"}
    )
    load_report_interval_ms: int = field(
        default=200, metadata={"help": "period asked of the workers' load streams"}
    )
    load_stale_s: float = field(
        default=5.0, metadata={"help": "a worker silent this long is taken out of routing"}
    )
    max_attempts: int = field(
        default=3, metadata={"help": "workers tried for a request that fails before any token"}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.policy not in available_policies():
            raise ValueError(
                f"unknown policy {self.policy!r}; choose from {', '.join(available_policies())}"
            )
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if self.load_report_interval_ms < 10:
            raise ValueError("load_report_interval_ms must be >= 10")
        if self.load_stale_s <= self.load_report_interval_ms / 1000.0:
            raise ValueError("load_stale_s must exceed the load report interval")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not self.etcd_endpoints:
            raise ValueError("--etcd needs at least one host:port")

    @property
    def etcd_endpoints(self) -> list[str]:
        return [e.strip() for e in self.etcd.split(",") if e.strip()]
