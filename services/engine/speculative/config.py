"""``SpeculativeConfig``: vLLM's ``--speculative-config`` JSON, checked on construction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

from services.engine.speculative.suffix import min_worker_bytes

METHODS = ("ngram", "suffix", "draft_model", "eagle3")
# num_speculative_tokens when not given. Measured at batch 1 on 2 CPU cores with the default
# model (benchmarks/RESULTS.md): k 16 against 4 on copy-heavy output, n-gram about 6.5x
# against 3.5x TPOT, chat the same; at batch 8 the step's cap (32 / 8) makes them equal.
DEFAULT_TOKENS = {"ngram": 16, "suffix": 16, "draft_model": 4, "eagle3": 4}
MAX_SUFFIX_DEPTH = 64
# The largest byte budget of the suffix method's tries (suffix_max_worker_bytes).
MAX_SUFFIX_BYTES = 2 << 30


@dataclass
class SpeculativeConfig:
    """How a worker speculates (field names are vLLM's where vLLM has the setting)."""

    # "ngram" (prompt lookup: continue an earlier match of the last tokens), "suffix" (a
    # suffix trie over this request's tokens and this worker's recent outputs) or
    # "draft_model" (a smaller model with the same vocabulary, ``model``) or "eagle3" (an
    # EAGLE-3 head for this target, ``model``: its folder in the public checkpoint format).
    method: str = "ngram"
    # draft_model, eagle3: the draft's folder (same tokenizer as the target).
    model: str | None = None
    # Most draft tokens verified per sequence and step (the adaptive length stays below it);
    # None: the method's default (DEFAULT_TOKENS): 16 for ngram and suffix (a proposal costs
    # next to nothing; the adaptive length and the step's cap keep chat and batches short),
    # 4 for draft_model and eagle3 (each draft token costs a pass of the draft).
    num_speculative_tokens: int | None = None
    # n-gram: longest and shortest tail of the context looked up in it.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # suffix: deepest context matched in the trie, and the recent outputs kept in it.
    suffix_max_depth: int = 24
    suffix_max_cached_requests: int = 256
    # suffix: a request's trie holds its last this many tokens (prompt and output), at
    # most ~suffix_max_depth x 265 bytes each (4096 at depth 24: 26 MB in the worst case).
    suffix_max_request_tokens: int = 4096
    # suffix: every trie of the worker together (the requests' and the recent outputs') holds
    # at most this many tokens: the oldest outputs go first, then the tries of the requests
    # that proposed least recently (disable_by_batch_size 8 requests at 4096 each).
    suffix_max_worker_tokens: int = 32768
    # suffix: ... and at most this many bytes of trie nodes (counted at ~265 bytes a node,
    # suffix_trie.NODE_BYTES; a token takes up to suffix_max_depth nodes, and its worst case
    # is reserved before it is indexed), evicted in the same order: the memory bound, whatever
    # the text (32768 tokens of random text at depth 24 took up to 208 MB under the token
    # budget alone; chat text shares most of its nodes). At least one request's worst case,
    # (suffix_max_request_tokens + 128) x suffix_max_depth x 265 (28 MB at the defaults, 72 MB
    # at depth 64), at most 2 GiB.
    suffix_max_worker_bytes: int = 128 << 20
    # suffix: a draft token is proposed while its share of the matched node's continuations
    # is at least this.
    suffix_min_token_prob: float = 0.1
    # suffix: at most this many drafts per token of the matched tail (vLLM's
    # suffix_decoding_max_spec_factor): a 1-token match is weak evidence for a long draft.
    suffix_max_spec_factor: float = 2.0
    # No speculation in a step with more running sequences than this (verifying k tokens of
    # a large batch costs more than it saves); 0: no limit.
    disable_by_batch_size: int = 8
    # Most draft tokens verified in one step, all sequences together (each of B running
    # sequences drafts at most this over B, at least one while the step is under it: with
    # more running sequences than this, only the first this many draft); 0: no limit. Verifying costs about what the
    # step's extra query tokens cost to compute: on 2 CPU cores 16 drafts at batch 1 made a
    # step ~1.5x a decode step; a GPU takes hundreds before a step costs more.
    max_draft_tokens_per_step: int = 32
    # What one draft token of each running sequence adds to a step, as a share of a decode
    # step (the adaptive length drafts only what its acceptance pays for): 0.034-0.038 on 2
    # CPU cores with the 135M model at batch 8 (one draft each: +27-30 % of the step; 2026-12-03,
    # RESULTS.md), 0.045-0.05 at batch 1 (16 drafts: 1.74x a decode step); far less on a GPU.
    # Since verifications run in the paged decode kernel (dcd0672): 0.016-0.03 at batch 8
    # (benchmarks/spec_step_cost.py); 0.04 kept until a quiet run compares the two. NOTE: the
    # scheduler's step-cost fit is not this cost on a CPU (its slope is a prefill token's).
    # With measure_draft_cost, the prior until a batch size has enough timed steps.
    draft_token_cost: float = 0.04
    # Measure the draft cost per batch size on this worker's decode and verification steps
    # (a least-squares fit of their wall time on their draft rows: draft_cost.py) and use it
    # in place of draft_token_cost, which is right for one machine and model at best (~0 on a
    # GPU). Off by default: on the shared CPU at load 44-60 it matched the constant on chat at
    # batch 8 but its copy-heavy batch-1 A/B was unresolved (repeats of both arms at 0.17x
    # from other processes' bursts), and a wall-time fit can read a burst as draft cost.
    measure_draft_cost: bool = False
    # Adapt each sequence's draft length to its measured acceptance.
    adaptive: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, f.type, getattr(self, f.name))
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_TOKENS[self.method]
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(
                f"num_speculative_tokens must be in [1, 32], got {self.num_speculative_tokens}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
        if (self.method in ("draft_model", "eagle3")) != (self.model is not None):
            raise ValueError("methods 'draft_model' and 'eagle3' need a 'model' (the draft's "
                             "folder), and only they take one")  # fmt: skip
        if not 2 <= self.suffix_max_depth <= MAX_SUFFIX_DEPTH:
            # NOTE: a request's trie has about depth nodes per token (~265 bytes each).
            raise ValueError(f"suffix_max_depth must be in [2, {MAX_SUFFIX_DEPTH}], got "
                             f"{self.suffix_max_depth}")  # fmt: skip
        if self.suffix_max_cached_requests < 0:
            raise ValueError("suffix_max_cached_requests must be >= 0")
        if (
            not self.suffix_max_depth
            <= self.suffix_max_request_tokens
            <= self.suffix_max_worker_tokens
        ):
            raise ValueError("need suffix_max_depth <= suffix_max_request_tokens <= "
                             f"suffix_max_worker_tokens, got {self.suffix_max_depth}, "
                             f"{self.suffix_max_request_tokens} and "
                             f"{self.suffix_max_worker_tokens}")  # fmt: skip
        least = min_worker_bytes(self.suffix_max_depth, self.suffix_max_request_tokens)
        if not least <= self.suffix_max_worker_bytes <= MAX_SUFFIX_BYTES:
            raise ValueError(f"suffix_max_worker_bytes must be in [{least}, {MAX_SUFFIX_BYTES}] "
                             "(at least one request's trie at its worst: "
                             "(suffix_max_request_tokens + 128) x suffix_max_depth x "
                             f"265 bytes), got {self.suffix_max_worker_bytes}")  # fmt: skip
        if not 0.0 <= self.suffix_min_token_prob <= 1.0:
            raise ValueError("suffix_min_token_prob must be in [0, 1]")
        if not 0.0 < self.suffix_max_spec_factor <= 32.0:
            raise ValueError("suffix_max_spec_factor must be in (0, 32]")
        if self.disable_by_batch_size < 0:
            raise ValueError("disable_by_batch_size must be >= 0")
        if self.max_draft_tokens_per_step < 0:
            raise ValueError("max_draft_tokens_per_step must be >= 0")
        if not 0.0 <= self.draft_token_cost < 1.0:
            raise ValueError("draft_token_cost must be in [0, 1)")

    @classmethod
    def parse(cls, text: str | dict[str, Any]) -> SpeculativeConfig:
        """From vLLM's JSON form (``{"method": "ngram", "num_speculative_tokens": 4, ...}``);
        an unknown key is an error rather than a silently ignored setting."""
        data = json.loads(text) if isinstance(text, str) else dict(text)
        if not isinstance(data, dict):
            raise ValueError("speculative_config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def _check_type(name: str, annotation: object, value: object) -> None:
    """ValueError unless ``value`` is of the field's type: JSON gives floats, strings and
    booleans for any key, and 4.5 passed 'num_speculative_tokens in [1, 32]' (then
    ``[0] * 4.5`` at start-up), a suffix_max_depth of 1e9 every check (then a TypeError
    slicing tokens in the scheduler: the first speculating step ended the engine)."""
    kind = str(annotation)  # NOTE: a string under ``from __future__ import annotations``
    if value is None and kind.endswith("| None"):
        return
    if kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)  # type: ignore[arg-type]
    elif kind.startswith("bool"):
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{name} must be {kind.split(' ')[0]}, got {value!r}")
