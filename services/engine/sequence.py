"""One sequence being generated: its tokens, KV blocks and progress (one per completion)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

import torch

from services.engine.outputs import TokenLogprobs
from services.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from services.engine.multimodal import MultiModalState
    from services.engine.structured_output import GrammarMatcher

_seq_counter = itertools.count()


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """A prompt plus the tokens generated so far.

    NOTE: ``num_computed_tokens`` counts tokens whose KV is in the cache. A step computes
    tokens ``[num_computed_tokens, num_computed_tokens + n)``; when that reaches
    ``num_tokens`` the step samples the next token. Decode is the case n == 1, a chunked
    prefill is the case n < remaining, and a preempted sequence is recomputed from 0.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache (first schedule)
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks registered so far
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprobs] = []  # of the outputs after the resumed ones
        self.num_resumed_tokens = 0  # leading outputs generated on another worker (migration)
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        # When a step last computed any of its tokens (arrival until then): offline aging
        # counts from here, so a flex sequence that keeps running never ages. How far it
        # aged, for good: 1 after offline_aging_s without a step, 2 after twice that
        # (tier_policy.py).
        self.last_run_time = self.arrival_time
        self.aged = 0
        # Its decode steps as tier_policy.py's pace counts them, online requests only: how many,
        # what they cost without their offline tokens, and those offline tokens (tokens' worth).
        self.paced_steps = 0
        self.paced_cost = 0.0
        self.paced_offline = 0.0
        self.first_token_time: float | None = None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            # The child index is mixed in so that n > 1 seeded completions differ.
            seed = (params.seed + index * 1_000_003) % 2**64  # what torch keeps of it anyway
            self.generator = torch.Generator().manual_seed(seed)
        # Blocks the caller already filled with KV (imported from elsewhere): treated as computed.
        self.num_preloaded_tokens = 0
        # Images of a vision-language prompt (M-RoPE positions, embeddings); None for text.
        self.mm: MultiModalState | None = None
        # Where the output is in its structured output grammar; None: unconstrained.
        self.structured: GrammarMatcher | None = None
        # LoRA adapter the sequence runs with (its name) and the seed of its block-hash chain
        # under that adapter (block_manager.chain_root); None: the base model.
        self.lora: str | None = None
        self.lora_root: int | None = None
        # Speculative decoding: the proposer's index over this sequence's tokens, and the
        # speculator's record of its acceptance (speculative/); None until it speculates.
        self.draft_state: Any = None
        self.draft_adapt: Any = None
        # PD's prefill side (a ``hold_kv`` request): an EAGLE-3 head keeps the target states
        # for the decode worker rather than running on them (speculative/handoff.py).
        self.exports_draft_states = False

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def in_prefill(self) -> bool:
        """True until the prompt (or, after preemption, the whole history) is in the cache."""
        return self.num_uncomputed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.name})"
        )


def prefill_tokens_left(waiting: Iterable[Sequence], running: Iterable[Sequence]) -> int:
    """The prompt tokens still to compute: all of the waiting sequences' and those of the
    running ones still in a (chunked) prefill. A prompt admitted into the batch is still
    queued prefill work: the load reports, routing and rebalancing read it (a running decode's
    one uncomputed token, the last sampled, is not prefill)."""
    return sum(s.num_uncomputed_tokens for s in waiting) + sum(
        s.num_uncomputed_tokens for s in running if s.in_prefill
    )
