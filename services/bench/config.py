"""Benchmark settings: one dataclass; `epdserve bench` flags are built from its fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DATASETS = ("random", "sharegpt", "prefix", "random-mm")
ENDPOINTS = ("completions", "chat")
SLO_KEYS = ("ttft", "tpot", "e2el")
# Lengths used when --input-len / --output-len are not given (vLLM's random defaults).
DEFAULT_INPUT_LEN = 1024
DEFAULT_OUTPUT_LEN = 128


@dataclass
class BenchConfig:
    """What to send, how fast, and where."""

    base_url: str = field(
        default="", metadata={"help": "server to benchmark, e.g. http://127.0.0.1:8000 (required)"}
    )
    endpoint: str = field(
        default="completions",
        metadata={"help": "completions: /v1/completions; chat: /v1/chat/completions",
                  "choices": ENDPOINTS},
    )  # fmt: skip
    dataset: str = field(default="random", metadata={"help": "prompt source", "choices": DATASETS})
    dataset_path: str | None = field(
        default=None, metadata={"help": "ShareGPT-format JSON file (--dataset sharegpt)"}
    )
    num_prompts: int = field(default=100, metadata={"help": "requests to send"})
    request_rate: float = field(
        default=math.inf, metadata={"help": "mean requests per second; inf sends all at once"}
    )
    burstiness: float = field(
        default=1.0,
        metadata={"help": "gamma shape of the arrival gaps: 1 = Poisson, <1 burstier, >1 steadier"},
    )
    max_concurrency: int | None = field(
        default=None, metadata={"help": "cap on requests in flight (none: no cap)"}
    )
    input_len: int | None = field(
        default=None,
        metadata={"help": f"prompt tokens (random; question tokens for prefix) "
                          f"(default {DEFAULT_INPUT_LEN}; prefix: 128)"},
    )  # fmt: skip
    output_len: int | None = field(
        default=None,
        metadata={"help": f"output tokens (default {DEFAULT_OUTPUT_LEN}; "
                          "sharegpt: each conversation's reply length)"},
    )  # fmt: skip
    range_ratio: float = field(
        default=0.0,
        metadata={"help": "random lengths are drawn from [len*(1-r), len*(1+r)]"},
    )
    prefix_groups: int = field(
        default=4, metadata={"help": "prefix dataset: groups sharing one system prefix"}
    )
    prefix_len: int = field(
        default=512, metadata={"help": "prefix dataset: tokens of each group's system prefix"}
    )
    image_size: str = field(
        default="448x448", metadata={"help": "random-mm: WIDTHxHEIGHT of each random image"}
    )
    images_per_request: int = field(
        default=1, metadata={"help": "random-mm: images in each request that has images"}
    )
    image_fraction: float = field(
        default=1.0,
        metadata={"help": "random-mm: fraction of requests with images; the others are text only"},
    )
    goodput: list[str] = field(
        default_factory=list,
        metadata={"help": "SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000 (milliseconds)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of prompts and arrival gaps"})
    result_json: str | None = field(
        default=None, metadata={"help": "write the full result (metrics, per request) here"}
    )
    model: str | None = field(
        default=None, metadata={"help": "model name to send (default: first of GET /v1/models)"}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "tokenizer folder (default: the embedded default model's)"},
    )
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature"})
    ignore_eos: bool = field(
        default=True,
        metadata={"help": "ask for exactly the output length (ignore_eos, min_tokens)"},
    )
    timeout_s: float = field(
        default=600.0, metadata={"help": "deadline of one request, connect to last byte"}
    )
    warmup: bool = field(
        default=True, metadata={"help": "send the first prompt once before timing (not counted)"}
    )
    progress: bool = field(default=True, metadata={"help": "progress line on stderr"})

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("--base-url must be an http(s) URL, e.g. http://127.0.0.1:8000")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}")
        if self.dataset == "sharegpt" and not self.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE")
        if self.dataset == "random-mm" and self.endpoint != "chat":
            raise ValueError("--dataset random-mm sends images: it needs --endpoint chat")
        parse_image_size(self.image_size)  # a bad --image-size fails here
        if self.images_per_request < 1:
            raise ValueError("--images-per-request must be >= 1")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise ValueError("--image-fraction must be in [0, 1]")
        if self.num_prompts < 1:
            raise ValueError("--num-prompts must be >= 1")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0 (or inf)")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError("--burstiness must be a finite number > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        for name in ("input_len", "output_len", "prefix_groups", "prefix_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError("--range-ratio must be in [0, 1)")
        if self.timeout_s <= 0:
            raise ValueError("--timeout-s must be > 0")
        parse_goodput(self.goodput)  # a bad --goodput fails here, before any request

    @property
    def root_url(self) -> str:
        """The base URL without a trailing slash or ``/v1`` (both spellings are accepted)."""
        url = self.base_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    @property
    def image_wh(self) -> tuple[int, int]:
        """--image-size as (width, height)."""
        return parse_image_size(self.image_size)

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        return self.root_url + path

    @property
    def slos(self) -> dict[str, float]:
        """--goodput as {"ttft"|"tpot"|"e2el": milliseconds}."""
        return parse_goodput(self.goodput)


def parse_goodput(items: list[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(
                f"--goodput {item!r}: expected KEY:MS with KEY in {', '.join(SLO_KEYS)}"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number") from None
        if not ms > 0:
            raise ValueError(f"--goodput {item!r}: the limit must be > 0 ms")
        slos[key] = ms
    return slos


def parse_image_size(text: str) -> tuple[int, int]:
    """``"448x336"`` -> ``(448, 336)``."""
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise ValueError(f"--image-size must be WIDTHxHEIGHT, e.g. 448x448, got {text!r}")
    return int(w), int(h)
