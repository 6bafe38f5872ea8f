"""Per-request sampling parameters, validated at construction (vLLM-compatible names)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from services.engine.service_tiers import DEFAULT, check_priority, check_service_tier

# NOTE: the bounds below are the engine's contract: every value inside them is safe in the
# sampler (no overflow, no NaN probabilities); the gateways check the same constants (400).
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5
# Temperatures in [GREEDY_TEMPERATURE, MIN_TEMPERATURE) are raised to it (as vLLM does):
# logits / 1e-38 overflows float32 to inf and the softmax to NaN.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (0.01, 10.0)  # logits are divided / multiplied by it
MAX_N = 256  # completions per request (each is a sequence in the batch)
MAX_TOP_K = 2**31 - 1  # the wire's int32; larger values mean "no top-k" anyway
MAX_STOP = 256  # stop strings, and stop token ids, per request (each is checked per token)
# Characters of all of a request's stop strings together. Why a bound: a stream holds back the
# longest stop string's length of text (it may be the start of one), so a 1 MB stop string
# held a whole answer back to its end, and the router and worker each kept a copy of it per
# sequence. vLLM has no bound (0.32: only "" is refused); real stop strings are short.
MAX_STOP_CHARS = 16384
# structured_outputs.choice strings per request. Why a bound: llguidance's compile time grows
# faster than the list (measured at load 14: 4,096 x 900 characters 3 s, 60,000 short ones
# 23 s, 100,000 52 s ending in a panic on its 65,525-symbol limit), each on one of the
# router's few preparation threads, and again on the worker. The values of all the ``enum``s
# of a JSON schema count against it too (200,000 short ones: 16 s, then "too big").
MAX_CHOICES = 4096
MAX_TOKEN_ID = 2**31 - 1  # the wire's int32 (the vocabulary check comes in LLMEngine.validate)
MAX_TOKEN_COUNT = 2**31 - 1  # max_tokens / min_tokens (the context length bounds them anyway)
MAX_SEED = 2**63 - 1  # the wire's int64
MIN_SEED = -(2**63)


def _enum_values(schema: Any) -> int:
    """The values of every ``enum`` list in a JSON schema (a loop: a schema nested 10,000
    deep must not exhaust the stack; the compiler refuses it)."""
    count, todo = 0, [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if isinstance(node.get("enum"), list):
                count += len(node["enum"])
            todo += node.values()
        elif isinstance(node, list):
            todo += node
    return count


@dataclass
class StructuredOutputsParams:
    """A constraint on the output (vLLM's guided decoding); exactly one kind is set. The
    engine compiles it with llguidance (services/engine/structured_output.py)."""

    json: str | dict[str, Any] | None = None  # a JSON Schema (object or JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None  # a regular expression the whole output matches
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # a Lark grammar (llguidance's dialect) or GBNF

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object must be a boolean")
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            found = ", ".join(kinds) or "none"
            raise ValueError(
                "structured_outputs must set exactly one of json, json_object, regex, choice, "
                f"grammar (found: {found})"
            )
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("structured_outputs.json must be a JSON Schema object")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        if self.choice is not None and len(self.choice) > MAX_CHOICES:
            raise ValueError(
                f"structured_outputs.choice holds {len(self.choice)} strings; at most "
                f"{MAX_CHOICES} are accepted"
            )

        if self.json is not None and (n := _enum_values(self.json)) > MAX_CHOICES:
            raise ValueError(f"structured_outputs.json: its enums hold {n} values; at most "
                             f"{MAX_CHOICES} are accepted")  # fmt: skip

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what the grammar is compiled from (and cached under)."""
        if self.json is not None:
            return "json", json.dumps(self.json)  # NOTE: key order is the output's order
        if self.json_object:
            return "json", '{"type": "object"}'
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        assert self.grammar is not None
        return "grammar", self.grammar


@dataclass
class SamplingParams:
    """How to sample one request. Every field is checked in ``__post_init__``."""

    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # [0, MAX_TEMPERATURE]; < GREEDY_TEMPERATURE means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = -1  # -1 (or 0) disables
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob
    seed: int | None = None  # per-request generator: same seed, same tokens
    presence_penalty: float = 0.0  # OpenAI: subtract if the token appeared in the output
    frequency_penalty: float = 0.0  # OpenAI: subtract count * penalty
    repetition_penalty: float = 1.0  # HF/CTRL: divide positive logits of seen tokens (RANGE)
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0  # EOS / stop tokens are masked until this many were generated
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: sampled token's logprob plus top-k
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # None: unconstrained
    # Token id -> a number in [-100, 100] added to its logit before penalties, temperature,
    # top-k/p and greedy (OpenAI's ``logit_bias``); ids past the vocabulary fail in
    # LLMEngine.validate, which knows the vocabulary.
    logit_bias: dict[int, float] | None = None
    # Scheduling class (service_tiers.py): "priority" > "default" (online) > "flex" (offline).
    service_tier: str = DEFAULT
    # Order inside the tier: lower runs first (vLLM's request priority).
    priority: int = 0
    # False: never speculate for this request (a worker with --speculative-config verifies
    # draft tokens for it otherwise). Speculation never changes the output; this opts out
    # of its cost, e.g. for a latency test that must compare like with like.
    speculative: bool = True

    def __post_init__(self) -> None:
        check_service_tier(self.service_tier)
        check_priority(self.priority)
        if not isinstance(self.speculative, bool):
            raise ValueError(f"speculative must be a boolean, got {self.speculative!r}")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("n", "top_k", "min_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("max_tokens", "logprobs", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer or None, got {value!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        self.stop = [s for s in self.stop if s]
        if len(self.stop) > MAX_STOP or len(self.stop_token_ids) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings and {MAX_STOP} stop token ids")
        if sum(map(len, self.stop)) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings hold {sum(map(len, self.stop))} characters in all; "
                             f"at most {MAX_STOP_CHARS} are accepted")  # fmt: skip
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n!r}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature}"
            )
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0  # greedy: no draw, so nothing to overflow
        elif self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.top_k == -1 or 0 <= self.top_k <= MAX_TOP_K):
            raise ValueError(
                f"top_k must be -1 or 0 (disabled) or in [1, {MAX_TOP_K}], got {self.top_k!r}"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        lo, hi = REPETITION_PENALTY_RANGE
        if not lo <= self.repetition_penalty <= hi:
            raise ValueError(
                f"repetition_penalty must be in [{lo}, {hi}], got {self.repetition_penalty}"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [{MIN_SEED}, {MAX_SEED}], got {self.seed}")
        if not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID
            for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be token ids in [0, {MAX_TOKEN_ID}]")
        if self.min_tokens > MAX_TOKEN_COUNT or (self.max_tokens or 0) > MAX_TOKEN_COUNT:
            raise ValueError(f"max_tokens and min_tokens must be <= {MAX_TOKEN_COUNT}")
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")
        if self.logit_bias is not None:
            self.logit_bias = _checked_logit_bias(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0  # set for every temperature < GREEDY_TEMPERATURE


def _checked_logit_bias(bias: object) -> dict[int, float]:
    """``bias`` as {token id: float}; ValueError unless every key is a token id >= 0 and
    every value a number in [-100, 100] (OpenAI's bounds)."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> number, got {bias!r}")
    out: dict[int, float] = {}
    for token, value in bias.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not -100.0 <= value <= 100.0  # NOTE: also false for NaN
        ):
            raise ValueError(
                f"logit_bias values must be numbers in [-100, 100], got {value!r} for {token}"
            )
        out[token] = float(value)
    return out
