"""What a local cluster is made of: its models, each with its workers of each role, its routers,
and the settings `epdserve up` hands its processes (services/cli/launcher.py starts them).
Checked when made: a bad spec is a ValueError before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.cpus import check_usable, parse_cpu_list
from services.common.etcd_server import EtcdSecurity
from services.common.member_config import check_cluster_name
from services.engine.model_files import served_name

# Most processes of one kind `up` starts on one machine, far above what a machine runs: the
# plan is built in memory first (`--mixed 1000000000` was accepted, and `up` sat after
# starting etcd building a list of 10^9 roles, 8 GB of references, before any worker started).
MAX_LOCAL_PROCESSES = 256


@dataclass
class ModelGroup:
    """One more base model of a cluster and its own workers (the spec's own fields describe
    the first model's); the router routes each request to its model's workers."""

    model: str | None  # HF folder or .gguf; None: embedded default
    served_model_name: str | None = None
    mixed: int = 1
    prefill: int = 0
    decode: int = 0
    encode: int = 0
    # LoRA adapters of this model only, "name=path" (up --lora-modules MODEL:name=path).
    lora_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("model", "served_model_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.isprintable()
                                      or not value.strip()):  # fmt: skip
                raise ValueError(f"{name} must be a non-empty printable string, got {value!r}")
        counts = (self.mixed, self.prefill, self.decode, self.encode)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
            raise ValueError("worker counts are integers")
        if min(counts) < 0:
            raise ValueError("worker counts must be >= 0")
        if max(counts) > MAX_LOCAL_PROCESSES:
            raise ValueError(f"at most {MAX_LOCAL_PROCESSES} workers of a role per model on "
                             f"one machine, got {max(counts)}")  # fmt: skip
        if bool(self.prefill) != bool(self.decode):
            raise ValueError("PD mode needs both --prefill N and --decode N (N >= 1)")
        if self.mixed + self.prefill == 0:
            raise ValueError("need at least one worker (--mixed N, or --prefill N --decode N)")

    def roles(self) -> list[str]:
        return (
            ["mixed"] * self.mixed + ["prefill"] * self.prefill + ["decode"] * self.decode
            + ["encode"] * self.encode
        )  # fmt: skip


@dataclass
class ClusterSpec:
    """What a local cluster is made of."""

    model: str | None = None  # HF folder or .gguf; None: embedded default
    served_model_name: str | None = None
    mixed: int = 1  # co-located workers
    prefill: int = 0  # PD mode: prefill workers (needs decode workers too)
    decode: int = 0  # PD mode: decode workers
    encode: int = 0  # EPD: encoder workers (vision-language models; beside mixed or PD)
    host: str = "127.0.0.1"
    port: int = 8000  # first router's HTTP port, the others follow it; 0 picks free ones
    routers: int = 1  # router replicas, all serving
    device: str = "cpu"
    cluster: str = "local"
    policy: str = "least_load"
    lease_ttl: int = 5
    engine_overrides: dict[str, object] = field(default_factory=dict)  # EngineConfig fields
    router_overrides: dict[str, object] = field(default_factory=dict)  # RouterConfig fields
    worker_overrides: dict[str, object] = field(default_factory=dict)  # WorkerConfig fields
    echo: bool = False  # copy children's output to stderr
    # Where the operator CLI finds this cluster (router URL + admin token, mode 0600);
    # None: a private temporary folder (tests), the CLI then needs --router/--admin-token.
    admin_dir: str | None = None
    kvstore: bool = False  # run the kvstore (global KV index + its Mooncake master)
    kvstore_overrides: dict[str, object] = field(default_factory=dict)  # KVStoreConfig fields
    # TLS / auth of the local etcd; the children get the matching EPDSERVE_ETCD_* env.
    etcd_security: EtcdSecurity | None = None
    # CA of the gateway's certificate (router_overrides ssl_certfile): the launcher's health
    # checks trust it; None: the system's CAs.
    gateway_ca: str | None = None
    # More base models, each with workers of its own (same engine, worker overrides).
    more_models: list[ModelGroup] = field(default_factory=list)
    # CPUs (Linux list, "0") the routers run on, every thread (EPDSERVE_CPUS, cpus.py); with
    # engine_overrides' cpu_cores on the others it keeps the gateway off the model's cores.
    # "": not pinned.
    frontend_cores: str = ""
    # LoRA adapters of the first model, "name=path" (each of more_models has its own).
    lora_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.first_model()  # checks the first model's worker counts
        check_cluster_name(self.cluster)
        if self.more_models and self.engine_overrides.get("lora_modules"):
            # NOTE: every model's workers would load them, trained for one model or not.
            raise ValueError("with several models, give each model its own LoRA adapters "
                             "(lora_modules of the spec and of each ModelGroup)")  # fmt: skip
        names = [served_name_of(g) for g in self.groups()]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a served name: {', '.join(names)}; give "
                             "each its own --served-model-name")  # fmt: skip
        # NOTE: checked here, before anything starts; the router found them after the model
        # loaded (an empty host: the worker failed, the router listened on every interface).
        check_usable(parse_cpu_list(self.frontend_cores), "--frontend-cores")
        if not self.host.strip():
            raise ValueError("--host must name an address (0.0.0.0: every interface)")
        if not 1 <= self.routers <= MAX_LOCAL_PROCESSES:
            raise ValueError(f"need 1 to {MAX_LOCAL_PROCESSES} routers (--routers N)")
        if not 0 <= self.port < 65536 or (self.port and self.port + self.routers > 65536):
            raise ValueError(
                f"router ports {self.port}..{self.port + self.routers - 1} must be in [0, 65535]"
            )

    def first_model(self) -> ModelGroup:
        """The spec's own model and its workers, as a group."""
        return ModelGroup(self.model, self.served_model_name, self.mixed, self.prefill,
                          self.decode, self.encode, self.lora_modules)  # fmt: skip

    def groups(self) -> list[ModelGroup]:
        """Every base model of the cluster with its workers, the spec's own first."""
        return [self.first_model(), *self.more_models]


def served_name_of(g: ModelGroup | ClusterSpec) -> str:
    """The name clients use for a group's model."""
    return g.served_model_name or served_name(g.model)
