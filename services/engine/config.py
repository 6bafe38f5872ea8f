"""Engine settings: one dataclass that checks itself; derived values are filled in by the engine."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from services.common.cpus import parse_cpu_cores
from services.common.dataclass_cli import check_types
from services.engine.service_tiers import DEFAULT_OFFLINE_AGING_S
from services.engine.speculative.config import SpeculativeConfig

DTYPES = ("float32", "bfloat16", "float16", "auto")
DEVICES = ("cpu", "cuda", "npu")
LOAD_FORMATS = ("auto", "dummy")
CPU_LINEAR = ("auto", "onednn", "torch")
POOLING = ("auto", "none", "embed", "classify")


@dataclass
class EngineConfig:
    """Everything the engine needs to load a model and schedule requests."""

    # Hugging Face folder, a .gguf file, or None for the embedded default model.
    model: str | None = None
    # Name the model is served under; defaults to the folder / file name.
    served_model_name: str | None = None
    # Weights and KV-cache dtype. "auto": float32 on CPU (bf16 matmul is slow there), else bf16.
    dtype: str = "auto"
    # cpu, cuda[:N] or npu[:N] (npu needs torch_npu, imported only then).
    device: str = "cpu"
    # Tokens per KV-cache block.
    block_size: int = 16
    # Most sequences in one running batch.
    max_num_seqs: int = 64
    # Token budget of one engine step (decode tokens + prefill chunk tokens).
    max_num_batched_tokens: int = 2048
    # Milliseconds the step thread waits for more arrivals before a step that would start
    # new prompts while a wave is starting: at least as many waiting as running, and fewer
    # here than produced output in the last step (a closed-loop client's successors of a
    # batch that ended together). It steps once no request came for this long, at most 8
    # windows after the first, or once as many are here as produced output. The wave's
    # prompts then run in one step instead of the first alone ahead of the rest (its second
    # token waiting a whole prefill step, the wave out of step from then on). A lone client
    # is not awaited; the first of a burst waits up to this long. 0: step at once.
    # See docs/performance.md and services/engine/async_engine.py (_gather_arrivals).
    arrival_window_ms: float = 20.0
    # Prompt tokens (new prompts and chunks of longer ones) one step may compute while at
    # least 8 running sequences decode per prompt waiting or in its prefill: each decode in a
    # step waits for its prompt tokens, so a lone prompt arriving beside a full batch of
    # decodes (a closed loop's wave out of step: the served ITL tail) is chunked over short
    # steps instead of one long one. A wave at an idle engine, or beside a few stragglers,
    # still runs in one step. 0: no cap (max_num_batched_tokens bounds the step).
    # See docs/performance.md and Scheduler._prefill_cap.
    max_prefill_tokens_while_decoding: int = 0
    # Context length limit; None: the model's max_position_embeddings capped at 8192.
    max_model_len: int | None = None
    # Bytes for the KV cache; None: derived from the device (see ModelRunner).
    kv_cache_bytes: int | None = None
    # Bytes of host memory (pinned on accelerators) keeping KV blocks evicted from the device
    # cache, to be copied back instead of recomputed; 0 disables the host tier.
    kv_host_pool_bytes: int = 0
    # Fraction of free device memory given to the KV cache on accelerators.
    gpu_memory_utilization: float = 0.85
    # Reuse KV blocks of identical prompt prefixes across requests.
    enable_prefix_caching: bool = True
    # Global seed for requests without their own seed.
    seed: int = 0
    # Capture CUDA graphs for decode batches (cuda only).
    enforce_eager: bool = False
    # "auto": the checkpoint's weights; "dummy": random weights, nothing read (benchmarks and
    # tests of the serving path; the config and tokenizer still come from the folder).
    load_format: str = "auto"
    # CPU matmuls: "onednn" (weights packed once for oneDNN, as vLLM's CPU backend does),
    # "torch" (F.linear: MKL), "auto" (oneDNN where it is faster on this CPU; see
    # layers/cpu_linear.py).
    cpu_linear: str = "auto"
    # Threads of the model's CPU ops (torch.set_num_threads, for the whole process); 0: every
    # core the process may run on (torch's default). Fewer leave cores to what shares the
    # machine (the worker's own I/O, a router, etcd): see docs/performance.md.
    cpu_threads: int = 0
    # CPUs (Linux list: "1", "1-3") the step thread and the model's OpenMP threads run on;
    # the worker's gRPC and asyncio threads stay on every CPU the process may use. "": not
    # pinned. "each:1-3": one OpenMP thread per CPU listed (thread i on the i-th), as vLLM
    # binds its threads; "each": so on every CPU the process may use. With cpu_threads 0 the
    # model uses one thread per CPU listed. Pinning the model apart from the I/O (and
    # `epdserve up --frontend-cores` for the router and etcd) is the layout vLLM's CPU
    # backend uses; see docs/performance.md.
    cpu_cores: str = ""
    # Serve a pooling model (embeddings, rerank, score) instead of generation: "embed" (the
    # last token's hidden state, normalised: Qwen3-Embedding), "classify" (a classification
    # head on the last token), "none" (generation), "auto" (*ForSequenceClassification:
    # classify; a bare *Model: embed; else generation). See pooler.py.
    pooling: str = "auto"
    # Make a causal LM a yes/no reranker from its lm_head rows of two tokens, "no,yes"
    # (Qwen3-Reranker, as vLLM's classifier_from_token); implies pooling "classify".
    classifier_from_tokens: str | None = None
    # Seconds without a step after which an offline (flex) request goes before the other
    # offline work (with offline_step_share), and after twice that (at once without a share)
    # is scheduled as an online one: nothing starves it (services/engine/tier_policy.py).
    offline_aging_s: float = DEFAULT_OFFLINE_AGING_S
    # Token budget of one step that offline (flex) sequences may take at most (the rest of
    # the step is online work's or idle): bounds what offline prefills add to online TPOT.
    # None: all that online work leaves.
    max_offline_batched_tokens: int | None = None
    # What offline (flex) tokens may add to the cost of a step that runs online work: 0.08 keeps
    # such a step within 8 % of its cost without them (so online TPOT too), from a model of the
    # step's cost the engine fits as it runs; a step with an online prefill gets none (its
    # TTFT, and the decodes beside it are the TPOT tail): services/engine/tier_policy.py. None:
    # offline work takes all that online work leaves.
    offline_step_share: float | None = 0.08
    # With offline_step_share: offline tokens may also raise each online request's time per
    # output token, and a step's cost, up to this quantile of recent online requests' own
    # (without offline work). Requests slower than it, and those in their prefill (TTFT), get
    # only the share (services/engine/tier_policy.py). More offline work, but on a quiet CPU
    # it raised online TPOT P99 by up to 40 % (benchmarks/RESULTS.md). None: the share alone.
    offline_tpot_quantile: float | None = None
    # LoRA adapters loaded at start-up, each "name=path" (a PEFT folder); a request names one
    # as its model. Giving any turns LoRA on.
    lora_modules: list[str] = field(default_factory=list)
    # Serve LoRA adapters (loaded later through the API) even without --lora-modules.
    enable_lora: bool = False
    # Adapters in one batch: device slots holding their factors, refilled least recently
    # used first (a batch naming more runs in several passes).
    max_loras: int = 4
    # Largest adapter rank accepted (the slots' width).
    max_lora_rank: int = 16
    # Speculative decoding in vLLM's JSON form, e.g. '{"method": "ngram",
    # "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}',
    # '{"method": "suffix"}', '{"method": "draft_model", "model": PATH}' or '{"method":
    # "eagle3", "model": HEAD}' (every key: speculative/config.py); None: no speculation.
    speculative_config: str | None = None
    # Devices (ranks) one worker runs the model on: the worker's process drives rank 0 and
    # starts N-1 rank processes (gloo on cpu, nccl on cuda:base+rank, hccl on npu).
    tensor_parallel_size: int = 1
    # With tensor parallelism, give each rank whole experts of an MoE model instead of a
    # slice of every expert (tokens are dispatched to the ranks holding their experts).
    enable_expert_parallel: bool = False
    # Expert parallelism: a JSON file of the experts each rank holds per sparse layer (EPLB),
    # loaded at start-up when it exists and written after every re-placement (`epdserve
    # experts rebalance`); None: contiguous experts at start-up, re-placements not kept.
    eplb_placement: str | None = None

    def __post_init__(self) -> None:
        check_types(self)  # NOTE: first: the bounds below let NaN and wrong types through
        if self.speculative_config is not None:
            self.speculative  # noqa: B018 - a bad JSON or setting fails here, not later
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(
                f"device must be one of {DEVICES} (optionally ':N'), got {self.device!r}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0 (0: every core), got {self.cpu_threads}")
        cpus, each = parse_cpu_cores(self.cpu_cores)  # a bad list fails here
        if each and self.cpu_threads > len(cpus):
            raise ValueError(f"cpu_cores {self.cpu_cores!r} pins one thread per CPU: "
                             f"{len(cpus)} CPUs for cpu_threads {self.cpu_threads}")  # fmt: skip
        if self.cpu_linear not in CPU_LINEAR:
            raise ValueError(f"cpu_linear must be one of {CPU_LINEAR}, got {self.cpu_linear!r}")
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")
        if self.classifier_from_tokens is not None:
            if self.pooling not in ("auto", "classify"):
                raise ValueError("classifier_from_tokens makes a classifier: pooling 'classify'")
            self.pooling = "classify"
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_prefill_tokens_while_decoding < 0:
            raise ValueError("max_prefill_tokens_while_decoding must be >= 0 (0: no cap), got "
                             f"{self.max_prefill_tokens_while_decoding}")  # fmt: skip
        if not 0.0 <= self.arrival_window_ms <= 100.0:  # NOTE: also false for NaN
            raise ValueError(f"arrival_window_ms must be in [0, 100], got {self.arrival_window_ms}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if self.kv_host_pool_bytes < 0:
            raise ValueError(f"kv_host_pool_bytes must be >= 0, got {self.kv_host_pool_bytes}")
        if self.max_offline_batched_tokens is not None and self.max_offline_batched_tokens < 1:
            raise ValueError(
                f"max_offline_batched_tokens must be >= 1, got {self.max_offline_batched_tokens}"
            )
        if self.offline_step_share is not None and not 0.0 < self.offline_step_share <= 10.0:
            raise ValueError(
                f"offline_step_share must be in (0, 10], got {self.offline_step_share}"
            )
        if self.offline_tpot_quantile is not None and not 0.0 < self.offline_tpot_quantile <= 1:
            raise ValueError(
                f"offline_tpot_quantile must be in (0, 1], got {self.offline_tpot_quantile}"
            )
        if not self.offline_aging_s >= 0.0:  # NOTE: also false for NaN
            raise ValueError(f"offline_aging_s must be >= 0, got {self.offline_aging_s}")
        for item in self.lora_modules:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules entries are name=path, got {item!r}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.eplb_placement and not (
            self.enable_expert_parallel and self.tensor_parallel_size > 1
        ):
            raise ValueError(
                "eplb_placement needs expert parallelism (enable_expert_parallel and "
                "tensor_parallel_size > 1)"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    @property
    def tier_settings(self) -> dict[str, Any]:
        """The scheduler's service-tier settings, as its keyword arguments."""
        names = ("offline_aging_s", "max_offline_batched_tokens", "offline_step_share",
                 "offline_tpot_quantile")  # fmt: skip
        return {name: getattr(self, name) for name in names}

    @property
    def pinned_cpus(self) -> list[int]:
        """``cpu_cores`` as CPU ids ([]: not pinned)."""
        return parse_cpu_cores(self.cpu_cores)[0]

    @property
    def pin_each(self) -> bool:
        """Whether ``cpu_cores`` pins one OpenMP thread per CPU ("each"), not to a set."""
        return parse_cpu_cores(self.cpu_cores)[1]

    @property
    def model_threads(self) -> int:
        """The model's CPU threads: ``cpu_threads``, else one per pinned CPU; 0: torch's
        default (every CPU the process may use)."""
        return self.cpu_threads or len(self.pinned_cpus)

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)

    @property
    def lora_paths(self) -> dict[str, str]:
        """``lora_modules`` as {name: path}."""
        return dict(item.split("=", 1) for item in self.lora_modules)

    @property
    def speculative(self) -> SpeculativeConfig | None:
        if self.speculative_config is None:
            return None
        try:
            return SpeculativeConfig.parse(self.speculative_config)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"speculative_config: {exc}") from None

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.device_type == "cpu" else "bfloat16"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
