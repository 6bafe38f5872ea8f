"""Worker settings (engine settings are EngineConfig's own flags)."""

from __future__ import annotations

import argparse
import os
import uuid
from dataclasses import dataclass, field

from services.common.dataclass_cli import add_dataclass_args, check_types
from services.common.grpc_utils import ROLES
from services.common.member_config import MemberConfig
from services.common.tracing import OTLP_TRACES_HELP
from services.engine.config import EngineConfig
from services.kvstore.store_tier import StoreConfig

# The line a worker prints on stdout once it serves; the launcher waits for it. NOTE: here, not in
# worker/main.py: the launcher (`epdserve up`, which lives as long as the cluster) would import
# torch and the whole engine through main.py for this one string.
READY_PREFIX = "EPDSERVE_WORKER_READY"


@dataclass
class WorkerConfig(MemberConfig):
    """How a worker process listens, names itself and joins the cluster."""

    role: str = field(
        default="mixed", metadata={"help": "mixed | prefill | decode | encode", "choices": ROLES}
    )
    load_report_interval_ms: int = field(
        default=200, metadata={"help": "default period of the StreamLoad stream"}
    )
    drain_timeout_s: float = field(
        default=60.0, metadata={"help": "on SIGTERM, wait this long for in-flight requests"}
    )
    engine_stall_s: float = field(
        default=30.0,
        metadata={
            "help": "an engine that finishes no model layer for this long while it has "
            "requests (a stopped or hung tensor-parallel rank, a kernel that does not return) "
            "stops the load reports: routers route around the worker and move its streams "
            "until it moves again. A step that is only slow (a loaded host) finishes layers "
            "and is not stuck; raise it for models whose one layer takes longer"
        },
    )
    role_drain_timeout_s: float = field(
        default=30.0,
        metadata={"help": "on a role change, wait this long for held requests, then abort them"},
    )
    kv_transfer: str = field(
        default="mooncake",
        metadata={
            "help": "KV (and image embedding) transfer for the PD and encode roles: "
            "mooncake | none (none: mixed role only)",
            "choices": ("mooncake", "none"),
        },
    )
    kv_staging: str = field(
        default="auto",
        metadata={
            "help": "KV transfer through pinned host staging slots: auto (when the KV cache is "
            "in device memory the installed Mooncake build cannot register: the non-CUDA "
            "wheel on a GPU) | on (always) | off (never: such a worker refuses to start)",
            "choices": ("auto", "on", "off"),
        },
    )
    kv_staging_bytes: int = field(
        default=512 << 20,
        metadata={
            "help": "host memory of the KV staging slots (requests in transfer at once); with "
            "tensor parallelism each rank holds this much, half to send and half to receive"
        },
    )
    draft_states_bytes: int = field(
        default=64 << 20,
        metadata={
            "help": "host memory registered for an EAGLE-3 head's states pushed with the KV "
            "(PD, workers with an EAGLE-3 head only): the regions of the reservations in flight "
            "and of the pushes being sent; when it is full, or 0, the states go through the "
            "router instead"
        },
    )
    mooncake_protocol: str = field(
        default="tcp",
        metadata={"help": "Mooncake transport: tcp | rdma", "choices": ("tcp", "rdma")},
    )
    mooncake_device: str = field(
        default="", metadata={"help": "RDMA device filter for Mooncake (empty: auto)"}
    )
    kv_transfer_timeout_s: float = field(
        default=30.0, metadata={"help": "prefill side: deadline for a request's KV push"}
    )
    # NOTE: the default is kv_sender.DEFAULT_MIN_WRITE_BYTES (a test keeps them equal);
    # this module does not import the sender, which pulls in the engine.
    kv_push_min_write_bytes: int = field(
        default=8 << 20,
        metadata={
            "help": "prefill side: queued layers are held until they add up to this many "
            "bytes, then written with one call; smaller suits RDMA/GPU, where a write call "
            "is cheap, larger suits TCP"
        },
    )
    reserve_timeout_s: float = field(
        default=30.0,
        metadata={
            "help": "decode side: reserved KV blocks are freed after this long unclaimed; the "
            "prefill side writes nothing into them from then on (and the router's Prefill "
            "call ends by then); 60 s more for a structured-output request, whose grammar "
            "the prefill worker may have to build first"
        },
    )
    kv_fence_timeout_s: float = field(
        default=300.0,
        metadata={
            "help": "decode side: blocks of a reservation freed before Decode claimed it are "
            "reused once its prefill worker fenced the push (or is gone); at the latest this "
            "long past the deadline (a writer stopped longer could still land a write)"
        },
    )
    kv_write_grace_s: float = field(
        default=10.0,
        metadata={
            "help": "decode side: as --kv-fence-timeout-s when the router did not say which "
            "prefill worker writes (no fence): the blocks are reused this long past the "
            "deadline (a write submitted just before it may still be landing; clock skew)"
        },
    )
    encoder_cache_bytes: int = field(
        default=512 * 1024 * 1024,
        metadata={"help": "encode role: bytes of image embeddings kept in the encoder cache"},
    )
    kv_store: str = field(
        default="",
        metadata={
            "help": "KV store tier (Mooncake Store) below the device and host pools: '' off, "
            "'auto' (the master the kvstore advertises in etcd) or the master's host:port"
        },
    )
    kv_store_metadata: str = field(
        default="",
        metadata={"help": "Mooncake metadata URL of a --kv-store host:port master "
                  "(http://host:port/metadata)"},
    )  # fmt: skip
    kv_store_segment_bytes: int = field(
        default=256 << 20, metadata={"help": "memory this worker lends to the KV store's pool"}
    )
    sleep_dir: str = field(
        default="",
        metadata={
            "help": "folder a sleeping worker writes its weights to (`epdserve models sleep`; "
            "room for the model's weights, fp32 on CPU); '': the system's temporary folder"
        },
    )
    otlp_traces_endpoint: str = field(default="", metadata={"help": OTLP_TRACES_HELP})

    def __post_init__(self) -> None:
        # NaN passes every bound below: a NaN --engine-stall-s silenced the load reports for
        # good, a NaN --kv-write-grace-s dropped released blocks from the quarantine unfreed.
        check_types(self)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        self.check_member()
        if self.load_report_interval_ms < 10:
            raise ValueError("load_report_interval_ms must be >= 10")
        if self.engine_stall_s <= 0:
            raise ValueError("engine_stall_s must be > 0")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
        if self.role_drain_timeout_s < 0:
            raise ValueError("role_drain_timeout_s must be >= 0")
        if self.kv_transfer not in ("mooncake", "none"):
            raise ValueError(f"kv_transfer must be mooncake or none, got {self.kv_transfer!r}")
        if self.kv_staging not in ("auto", "on", "off"):
            raise ValueError(f"kv_staging must be auto, on or off, got {self.kv_staging!r}")
        if self.kv_staging_bytes <= 0:
            raise ValueError("kv_staging_bytes must be > 0")
        if not 0 <= self.draft_states_bytes <= 1 << 40:
            raise ValueError("draft_states_bytes must be in [0, 2**40]")
        if self.mooncake_protocol not in ("tcp", "rdma"):
            raise ValueError(
                f"mooncake_protocol must be tcp or rdma, got {self.mooncake_protocol!r}"
            )
        if self.encoder_cache_bytes < 0:
            raise ValueError("encoder_cache_bytes must be >= 0")
        if self.kv_transfer_timeout_s <= 0 or self.reserve_timeout_s <= 0:
            raise ValueError("kv_transfer_timeout_s and reserve_timeout_s must be > 0")
        if self.kv_write_grace_s < 0 or self.kv_fence_timeout_s < 0:
            raise ValueError("kv_write_grace_s and kv_fence_timeout_s must be >= 0")
        if self.kv_push_min_write_bytes < 1:
            raise ValueError("kv_push_min_write_bytes must be >= 1")
        if self.kv_transfer == "none" and self.role in ("prefill", "decode", "encode"):
            raise ValueError(f"role {self.role!r} needs KV transfer (--kv-transfer mooncake)")
        if self.kv_store == "auto" and not self.register:
            raise ValueError("--kv-store auto finds the master in etcd: it needs --register")
        if self.kv_store not in ("", "auto"):
            StoreConfig(self.kv_store, self.kv_store_metadata)  # raises for a bad address
        if self.kv_store_segment_bytes <= 0:
            raise ValueError("kv_store_segment_bytes must be > 0")
        if self.sleep_dir and not os.path.isdir(self.sleep_dir):
            raise ValueError(f"--sleep-dir {self.sleep_dir!r} is not a folder")

    @staticmethod
    def new_incarnation() -> str:
        return uuid.uuid4().hex[:12]


def build_parser(prog: str = "epdserve worker") -> argparse.ArgumentParser:
    """The worker's command line: its settings and the engine's. NOTE: here, not in main.py:
    a starting worker parses it before the heavy imports (worker/starting.py)."""
    parser = argparse.ArgumentParser(prog=prog, description="Run one epdserve worker process.")
    add_dataclass_args(parser.add_argument_group("worker"), WorkerConfig)
    add_dataclass_args(parser.add_argument_group("engine"), EngineConfig)
    parser.add_argument("--log-level", default="INFO")
    return parser
