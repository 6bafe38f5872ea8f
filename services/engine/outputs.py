"""What the engine hands back: one RequestOutput per request per step (streaming) or at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.engine.speculative.stats import SpecStats

# stop_reason of a request ended because it must recompute image tokens whose images this
# engine does not have (a PD decode worker after a preemption): it can go on elsewhere.
LOST_IMAGES = "images unavailable for recompute"


@dataclass
class Logprob:
    """Log-probability of one candidate token (from the raw model logits, before penalties)."""

    token_id: int
    logprob: float


@dataclass
class TokenLogprobs:
    """The sampled token's logprob and the top-k alternatives at one position."""

    token_id: int  # the sampled token
    logprob: float  # its log-probability
    top: list[Logprob] = field(default_factory=list)  # top-k candidates, best first


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request.

    In streaming (delta) outputs, ``token_ids``, ``text`` and ``logprobs`` hold only what is
    new since the previous output for this completion; in final outputs they hold everything.
    """

    index: int  # which of the n completions
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # None unless SamplingParams.logprobs was set
    finish_reason: str | None = None  # None while running; "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All completions of one request."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool  # True once every completion has finished
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt: str | None = None
    # Set when the engine ended this request alone because processing it raised (a bug or
    # numbers no model step should produce): the worker reports it as the request's own
    # failure, which the router does not retry elsewhere. The other requests go on.
    error: str | None = None


class LoRANotLoaded(ValueError):
    """A request names a LoRA adapter this engine does not hold: unloaded meanwhile, or
    never loaded here. Not the request's fault (another worker may hold the adapter), so
    the worker answers NOT_FOUND, not INVALID_ARGUMENT (worker/errors.py)."""


class RequestFailedError(Exception):
    """One request failed inside the engine (``RequestOutput.error``); the engine, the
    worker and every other request are fine. NOTE: not a RuntimeError, which callers take
    for a dead engine."""


@dataclass
class EngineStats:
    """A snapshot of the engine's queues and KV cache (the worker's load report and metrics)."""

    num_waiting: int  # sequences queued, not yet running
    num_running: int  # sequences in the running batch
    num_waiting_prompt_tokens: int  # prompt tokens still to compute (waiting, or in prefill)
    kv_utilization: float  # fraction of KV blocks in use (0..1)
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hit_rate: float  # prompt tokens served from the cache / prompt tokens looked up
    num_preemptions: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # of which found in the cache (cumulative)
    prompt_tokens_computed: int = 0  # prompt tokens run through the model (cumulative)
    kv_host_hit_blocks: int = 0  # prompt blocks copied back from the host pool (cumulative)
    kv_store_hit_blocks: int = 0  # prompt blocks fetched from the KV store (cumulative)
    kv_host_blocks_used: int = 0  # blocks held by the host pool
    kv_host_blocks_total: int = 0  # capacity of the host pool (0: no host tier)
    kv_store_put_blocks: int = 0  # blocks written to the KV store (cumulative)
    # Of num_preemptions, those of each service tier's sequences (cumulative).
    preemptions_by_tier: dict[str, int] = field(default_factory=dict)
    # Of the counts above, those of offline (flex) sequences, and the KV blocks they hold.
    num_offline_waiting: int = 0
    num_offline_running: int = 0
    num_offline_waiting_prompt_tokens: int = 0
    num_offline_blocks: int = 0
    # The step cost the service tiers fit (tier_policy.StepCost): a step of n tokens takes
    # about step_fixed_ms + n * step_token_ms of wall time now; 0 and 0 before a fit.
    step_fixed_ms: float = 0.0
    step_token_ms: float = 0.0
    # Of the decode step time of the online requests that ended in the pace's window (30 s),
    # the part the offline tokens run beside them took (0..1; tier_policy.OnlinePace).
    online_tpot_offline_share: float = 0.0
    # Speculative decoding counters (cumulative); None when the engine does not speculate.
    spec: SpecStats | None = None
