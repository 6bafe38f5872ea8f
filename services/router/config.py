"""Router settings."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from services.common.dataclass_cli import check_types
from services.common.grpc_utils import GrpcTLS
from services.common.member_config import check_cluster_name
from services.common.tracing import OTLP_TRACES_HELP
from services.engine.sampling_params import MAX_TOKEN_COUNT
from services.router.config_parts import YEAR_S, OfflineSettings, RebalanceSettings
from services.router.features.images import ImageLimits
from services.router.features.reasoning.factory import NONE as NO_REASONING
from services.router.features.reasoning.factory import available_reasoning_parsers
from services.router.features.tool_parsers.factory import available_tool_parsers
from services.router.http_limits import BODY_TIMEOUT_S, HEAD_TIMEOUT_S, MAX_CONNECTIONS, HttpLimits
from services.router.routing.lora_affinity import DEFAULT_SLACK
from services.router.routing.policies.factory import available_policies
from services.router.routing.restarts import MAX_RESTART_WAIT_S, RESTART_WAIT_S
from services.router.shutdown import SHUTDOWN_GRACE_S


@dataclass
class RouterConfig(RebalanceSettings, OfflineSettings):
    """How the router listens, finds workers and routes requests (the role rebalancer's and the
    offline work's settings: config_parts.py)."""

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
    lora_affinity_slack: float = field(
        default=DEFAULT_SLACK,
        metadata={
            "help": "LoRA-aware routing: a worker holding a request's adapter in an engine "
            "slot is preferred while its load (requests) is within this of the least-loaded "
            "worker's"
        },
    )
    request_timeout_s: float = field(
        default=600.0, metadata={"help": "deadline of one generation on a worker"}
    )
    shutdown_grace_s: float = field(default=SHUTDOWN_GRACE_S, metadata={
        "help": "on SIGTERM, seconds the requests in flight get to finish; those still running "
        "then end with a 503 in their API's format (the chart's router pods get this plus "
        "router.terminationGraceExtraSeconds)"})  # fmt: skip
    load_report_interval_ms: int = field(
        default=200, metadata={"help": "period asked of the workers' load streams"}
    )
    load_stale_s: float = field(
        default=5.0,
        metadata={
            "help": "a worker whose load reports stop this long and that "
            "does not answer a health Check is taken out of routing (one "
            "that answers ranks below those reporting)"
        },
    )
    max_attempts: int = field(
        default=3, metadata={"help": "workers tried for a request that fails before any token"}
    )
    max_migrations: int = field(
        default=3,
        metadata={
            "help": "times a request whose worker died or hung mid-stream is continued "
            "on another worker (0: fail it)"
        },
    )
    poison_max_deaths: int = field(
        default=2,
        metadata={
            "help": "a request running on this many workers that died or hung is not sent to "
            "another, and its identical retries are refused for 10 minutes (1: never resend "
            "a request whose worker died)"
        },
    )
    worker_restart_wait_s: float = field(default=RESTART_WAIT_S, metadata={
        "help": "a request finding no worker of a role where one died serving (its only "
        "decode or mixed worker killed) waits up to this many seconds for it to be restarted "
        "(epdserve up, Kubernetes) and goes on there; a stream continues from its tokens "
        "(0: fail at once with no_workers). The wait ends at request_timeout_s too; that 503's "
        "Retry-After is what is left of this wait. A request for a model whose only workers are "
        "starting (their model not loaded yet) waits the same way, up to this long from their "
        "start"})  # fmt: skip
    stall_timeout_s: float = field(
        default=60.0,
        metadata={
            "help": "a stream with no message this long is treated as hung even while its "
            "worker still sends load reports (its first message may take longer: up to 4x "
            "the worker's queue and the request's own prefill at the measured rate)"
        },
    )
    worker_mux: bool = field(default=True, metadata={
        "help": "send the Generate requests of this router to a worker over one shared gRPC "
        "stream per worker instead of a call each (less CPU a request on both sides); a "
        "broken stream fails its requests as a dead worker's, which migrate. "
        "--no-worker-mux: a call per request"})  # fmt: skip
    admin_token_file: str | None = field(
        default=None,
        metadata={
            "help": "file holding the bearer token of /admin (else env EPDSERVE_ADMIN_TOKEN; "
            "neither: the admin API is off)"
        },
    )

    api_keys_file: str | None = field(
        default=None,
        metadata={
            "help": "file of the gateway's API keys, one per line (else env EPDSERVE_API_KEYS, "
            "comma-separated; neither: the API is open)"
        },
    )
    max_body_bytes: int = field(
        default=4 * 1024 * 1024, metadata={"help": "largest request body accepted (else 413)"}
    )
    # NOTE: only reading a request is timed; a response (a stream of minutes) never is.
    http_head_timeout_s: float = field(default=HEAD_TIMEOUT_S, metadata={
        "help": "a request's head (request line and headers) must arrive within this many "
        "seconds of its first byte, or of the connection (else 408 and close)"})  # fmt: skip
    http_body_timeout_s: float = field(default=BODY_TIMEOUT_S, metadata={
        "help": "a request's body must arrive within this many seconds of its head (else 408 "
        "and close; a total, so a byte every few seconds does not hold a connection)"})  # fmt: skip
    http_max_connections: int = field(default=MAX_CONNECTIONS, metadata={
        "help": "open HTTP connections at most; a connection past it gets 503 and is closed "
        "(the router raises its open-files limit to fit, up to the hard limit)"})  # fmt: skip
    max_n: int = field(default=16, metadata={"help": "largest 'n' (choices per prompt) accepted"})
    max_tokens_limit: int | None = field(
        default=None,
        metadata={"help": "largest max_tokens accepted (always also capped by the context)"},
    )
    max_prompts: int = field(
        default=64,
        metadata={"help": "most prompts in one /v1/completions request"},
    )
    max_pooling_inputs: int = field(
        default=2048,
        metadata={
            "help": "most inputs (texts, token-id lists, documents, pairs) in one embeddings, "
            "rerank or score request (OpenAI's embeddings limit: clients such as LangChain "
            "send up to 1000-2048 texts at once); the request's tokens also count against "
            "--max-queued-tokens"
        },
    )
    preprocess_threads: int = field(
        default=4,
        metadata={
            "help": "threads that tokenize prompts, render chat templates and compile output "
            "grammars off the event loop (a large prompt then delays no other stream)"
        },
    )
    response_ttl_s: float = field(
        default=3600.0,
        metadata={"help": "how long a stored Responses API response (store=true) is kept"},
    )
    response_max_record_bytes: int = field(
        default=256 * 1024,
        metadata={"help": "largest stored response kept in etcd; a larger one is a file of "
                  "<batch-dir>/responses with a pointer in etcd (shared by every router too)"},
    )  # fmt: skip
    response_max_records: int = field(
        default=10000, metadata={"help": "most stored responses in etcd (then: router memory)"}
    )
    response_local_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata={"help": "memory of the router's own store of responses (LRU)"},
    )
    max_images: int = field(
        default=8, metadata={"help": "most images in one chat request (else 400)"}
    )
    max_image_bytes: int = field(
        default=8 * 1024 * 1024, metadata={"help": "largest encoded image accepted (else 400)"}
    )
    max_image_pixels: int = field(
        default=4096 * 4096, metadata={"help": "largest image (width * height) accepted"}
    )
    image_fetch_timeout_s: float = field(
        default=10.0, metadata={"help": "deadline of fetching one http(s) image URL"}
    )
    allow_private_image_urls: bool = field(
        default=False,
        metadata={
            "help": "let http(s) image URLs resolve to private, loopback or link-local addresses"
        },
    )
    tool_call_parser: str = field(
        default="hermes",
        metadata={
            "help": "format of tool calls in the model's output (tool_choice 'auto'): "
            + ", ".join(available_tool_parsers()),
            "choices": tuple(available_tool_parsers()),
        },
    )
    reasoning_parser: str = field(
        default=NO_REASONING,
        metadata={
            "help": "split the reasoning (<think>...</think>) from the content of chat "
            "outputs: none, " + ", ".join(available_reasoning_parsers()),
            "choices": (NO_REASONING, *available_reasoning_parsers()),
        },
    )
    max_queued_tokens: int = field(
        default=262144,
        metadata={
            "help": "prompt tokens of admitted, unfinished requests the router holds at most, "
            "per base model; more: 429 with Retry-After"
        },
    )
    wake_asleep_models: bool = field(default=False, metadata={
        "help": "a request for a model whose workers all sleep (epdserve models sleep) wakes "
        "one of them, and waits for it as long as it waits anyway; off: it only waits"})  # fmt: skip
    max_awake_models: int = field(default=0, metadata={
        "help": "with --wake-asleep-models: base models awake at most; waking another first "
        "puts the idlest awake one to sleep (none in flight on its workers, least recently "
        "asked for), and waits while every other awake model is busy; 0: no cap"})  # fmt: skip
    ssl_certfile: str | None = field(
        default=None, metadata={"help": "serve the gateway over HTTPS with this certificate file"}
    )
    ssl_keyfile: str | None = field(
        default=None, metadata={"help": "private key file of --ssl-certfile"}
    )
    grpc_tls_ca: str | None = field(
        default=None,
        metadata={"help": "mutual TLS to the workers: CA file their certificates are checked with"},
    )
    grpc_tls_cert: str | None = field(
        default=None, metadata={"help": "mutual TLS to the workers: this router's certificate"}
    )
    grpc_tls_key: str | None = field(
        default=None, metadata={"help": "mutual TLS to the workers: this router's private key"}
    )
    grpc_tls_server_name: str | None = field(
        default=None,
        metadata={
            "help": "name the workers' certificate carries, checked instead of the dialled "
            "address (default: the address)"
        },
    )
    otlp_traces_endpoint: str = field(default="", metadata={"help": OTLP_TRACES_HELP})

    def __post_init__(self) -> None:
        # NOTE: first: a NaN timeout passes the bounds below and reaches asyncio.wait_for,
        # which times out at once; inf and the wrong types fail here too.
        check_types(self)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.host.strip():  # uvicorn took "" for every interface
            raise ValueError("host must name an address (0.0.0.0: every interface)")
        check_cluster_name(self.cluster)
        _one_of("policy", self.policy, available_policies())
        if not 0 <= self.lora_affinity_slack <= 1e6:
            raise ValueError("lora_affinity_slack must be in [0, 1e6]")
        # NOTE: the upper bounds: a value of 1e300 looked valid and switched the check off
        # (a hung worker never left routing, a hung stream or generation never ended).
        if not 0 < self.request_timeout_s <= 86400:
            raise ValueError("request_timeout_s must be in (0, 86400]")
        if not 0 <= self.shutdown_grace_s <= 86400:
            raise ValueError("shutdown_grace_s must be in [0, 86400]")
        if self.load_report_interval_ms < 10:
            raise ValueError("load_report_interval_ms must be >= 10")
        if self.load_stale_s <= self.load_report_interval_ms / 1000.0:
            raise ValueError("load_stale_s must exceed the load report interval")
        if self.load_stale_s > 3600:
            raise ValueError("load_stale_s must be <= 3600")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.max_migrations < 0:
            raise ValueError("max_migrations must be >= 0")
        if self.poison_max_deaths < 1:
            raise ValueError("poison_max_deaths must be >= 1")
        if not 0 <= self.worker_restart_wait_s <= MAX_RESTART_WAIT_S:
            raise ValueError(f"worker_restart_wait_s must be in [0, {MAX_RESTART_WAIT_S:g}]")
        if not 0 < self.stall_timeout_s <= 86400:
            raise ValueError("stall_timeout_s must be in (0, 86400]")
        if self.max_awake_models < 0:
            raise ValueError("max_awake_models must be >= 0 (0: no cap)")
        if self.max_awake_models and not self.wake_asleep_models:
            raise ValueError("max_awake_models needs wake_asleep_models (only a wake-up swaps)")
        if not self.etcd_endpoints:
            raise ValueError("--etcd needs at least one host:port")
        _one_of("tool_call_parser", self.tool_call_parser, available_tool_parsers())
        _one_of("reasoning_parser", self.reasoning_parser,
                [NO_REASONING, *available_reasoning_parsers()])  # fmt: skip
        if not 0 < self.image_fetch_timeout_s <= 3600:
            raise ValueError("image_fetch_timeout_s must be in (0, 3600]")
        # NOTE: 0.1 s at least: a head timeout of 1e-300 passed '> 0', and every request got a 408.
        if not (
            0.1 <= self.http_head_timeout_s <= 86400 and 0.1 <= self.http_body_timeout_s <= 86400
        ):
            raise ValueError("http_head_timeout_s and http_body_timeout_s must be in [0.1, 86400]")
        if not 1 <= self.response_ttl_s <= YEAR_S:  # 1e300 overflowed the etcd lease's TTL
            raise ValueError(f"response_ttl_s must be in [1, {YEAR_S}] (a year)")
        for name in (
            "max_body_bytes", "max_n", "max_prompts", "max_pooling_inputs", "max_queued_tokens",
            "max_images",
            "max_image_bytes", "max_image_pixels", "response_max_record_bytes",
            "response_max_records", "response_local_bytes", "http_max_connections",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.preprocess_threads < 1:
            raise ValueError("preprocess_threads must be >= 1")
        # NOTE: at most the wire's int32: a larger one reached the engine as the max_tokens of
        # every chat request that gives none (a 400 naming no parameter).
        if self.max_tokens_limit is not None and not 1 <= self.max_tokens_limit <= MAX_TOKEN_COUNT:
            raise ValueError(f"max_tokens_limit must be in [1, {MAX_TOKEN_COUNT}] when set")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
        _ = self.grpc_tls  # all three TLS files or none
        self._check_offline()
        self._check_rebalance()

    @property
    def http_limits(self) -> HttpLimits:
        return HttpLimits(self.http_head_timeout_s, self.http_body_timeout_s,
                          self.http_max_connections)  # fmt: skip

    @property
    def grpc_tls(self) -> GrpcTLS | None:
        """Client-side mutual TLS towards the workers; None: plain gRPC."""
        return GrpcTLS.from_files(
            self.grpc_tls_ca, self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_server_name
        )

    @property
    def scheme(self) -> str:
        """The gateway's URL scheme."""
        return "https" if self.ssl_certfile else "http"

    @property
    def etcd_endpoints(self) -> list[str]:
        return [e.strip() for e in self.etcd.split(",") if e.strip()]

    @property
    def batch_root(self) -> str:
        return self.batch_dir or os.path.join(
            tempfile.gettempdir(), f"epdserve-batches-{self.cluster}"
        )

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            self.max_images, self.max_image_bytes, self.max_image_pixels,
            self.image_fetch_timeout_s, self.allow_private_image_urls,
        )  # fmt: skip


def _one_of(name: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")
