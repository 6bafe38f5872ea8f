"""Prompt sets: random token prompts, ShareGPT-format conversations, shared-prefix groups.

Each builder takes the config and a Hugging Face tokenizer and returns ``SampleRequest``s;
``build_dataset`` picks one by name. Token counts are those of ``tokenizer.encode(text,
add_special_tokens=False)``: what vLLM's bench reports as input tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.bench.config import DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN, BenchConfig
from services.bench.messages import SampleRequest

# Decode -> re-encode rarely gives back the same count at once (merges across the random
# tokens); a few trims/pads converge. Bounded so that a strange tokenizer cannot loop.
_MAX_ADJUST = 16
# ShareGPT filters of vLLM's bench: drop tiny turns and over-long conversations.
_SHAREGPT_MIN_LEN = 4
_SHAREGPT_MAX_PROMPT = 1024
_SHAREGPT_MAX_TOTAL = 2048
PREFIX_QUESTION_LEN = 128


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def length_range(length: int, ratio: float) -> tuple[int, int]:
    """The inclusive [low, high] lengths allowed by --range-ratio (low is at least 1)."""
    low = max(1, math.floor(length * (1.0 - ratio)))
    high = max(low, math.ceil(length * (1.0 + ratio)))
    return low, high


def _ordinary_ids(tokenizer: Any) -> np.ndarray:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = np.arange(int(tokenizer.vocab_size))
    return ids[~np.isin(ids, list(special))] if special else ids


def random_text(tokenizer: Any, length: int, rng: np.random.Generator, pool: np.ndarray) -> str:
    """Text of random ordinary tokens that re-encodes to ``length`` tokens (nearly always
    exactly; the last adjustment is kept if the tokenizer never settles)."""
    ids = rng.choice(pool, size=length).tolist()
    text = tokenizer.decode(ids)
    for _ in range(_MAX_ADJUST):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == length:
            break
        if len(ids) > length:
            ids = ids[:length]
        else:
            ids = ids + rng.choice(pool, size=length - len(ids)).tolist()
        text = tokenizer.decode(ids)
    return text


def random_dataset(
    cfg: BenchConfig, tokenizer: Any, rng: np.random.Generator
) -> list[SampleRequest]:
    """Prompts of random tokens; lengths uniform in the --range-ratio window."""
    pool = _ordinary_ids(tokenizer)
    in_lo, in_hi = length_range(cfg.input_len or DEFAULT_INPUT_LEN, cfg.range_ratio)
    out_lo, out_hi = length_range(cfg.output_len or DEFAULT_OUTPUT_LEN, cfg.range_ratio)
    in_lens = rng.integers(in_lo, in_hi + 1, size=cfg.num_prompts)
    out_lens = rng.integers(out_lo, out_hi + 1, size=cfg.num_prompts)
    out = []
    for n_in, n_out in zip(in_lens.tolist(), out_lens.tolist(), strict=True):
        text = random_text(tokenizer, n_in, rng, pool)
        out.append(SampleRequest(text, count_tokens(tokenizer, text), n_out))
    return out


def load_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(first human turn, first reply) of each conversation with at least two turns."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        prompt, reply = first.get("value"), second.get("value")
        if isinstance(prompt, str) and isinstance(reply, str):
            pairs.append((prompt, reply))
    return pairs


def sharegpt_dataset(
    cfg: BenchConfig, tokenizer: Any, rng: np.random.Generator
) -> list[SampleRequest]:
    """Shuffled conversations; output length = the reply's tokens unless --output-len."""
    assert cfg.dataset_path is not None
    pairs = load_sharegpt(cfg.dataset_path)
    order = rng.permutation(len(pairs)).tolist()
    out: list[SampleRequest] = []
    for i in order:
        if len(out) == cfg.num_prompts:
            break
        prompt, reply = pairs[i]
        n_in = count_tokens(tokenizer, prompt)
        n_out = cfg.output_len or count_tokens(tokenizer, reply)
        if n_in < _SHAREGPT_MIN_LEN or (cfg.output_len is None and n_out < _SHAREGPT_MIN_LEN):
            continue
        if n_in > _SHAREGPT_MAX_PROMPT or n_in + n_out > _SHAREGPT_MAX_TOTAL:
            continue
        out.append(SampleRequest(prompt, n_in, n_out))
    if len(out) < cfg.num_prompts:
        raise ValueError(
            f"{cfg.dataset_path}: only {len(out)} usable conversations for "
            f"--num-prompts {cfg.num_prompts}"
        )
    return out


def prefix_dataset(
    cfg: BenchConfig, tokenizer: Any, rng: np.random.Generator
) -> list[SampleRequest]:
    """--prefix-groups groups, each with one random system prefix of --prefix-len tokens
    and random questions of --input-len tokens; shuffled so that groups interleave."""
    pool = _ordinary_ids(tokenizer)
    prefixes = [
        random_text(tokenizer, cfg.prefix_len, rng, pool).rstrip() for _ in range(cfg.prefix_groups)
    ]
    q_lo, q_hi = length_range(cfg.input_len or PREFIX_QUESTION_LEN, cfg.range_ratio)
    o_lo, o_hi = length_range(cfg.output_len or DEFAULT_OUTPUT_LEN, cfg.range_ratio)
    out = []
    for i in range(cfg.num_prompts):
        group = i % cfg.prefix_groups
        question = random_text(tokenizer, int(rng.integers(q_lo, q_hi + 1)), rng, pool)
        req = SampleRequest(question, 0, int(rng.integers(o_lo, o_hi + 1)), prefixes[group], group)
        req.prompt_len = count_tokens(tokenizer, req.full_text)
        out.append(req)
    return [out[i] for i in rng.permutation(len(out)).tolist()]


def random_image_url(width: int, height: int, rng: np.random.Generator) -> str:
    """A PNG of random pixels as a data: URL (never the same twice: no encoder-cache hits)."""
    import base64
    import io

    from PIL import Image

    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def random_mm_dataset(
    cfg: BenchConfig, tokenizer: Any, rng: np.random.Generator
) -> list[SampleRequest]:
    """The random dataset with --images-per-request random images of --image-size on a
    --image-fraction of the requests (the others text only, a mixed workload). Prompt
    lengths count the text; the server's usage counts the image tokens too."""
    out = random_dataset(cfg, tokenizer, rng)
    width, height = cfg.image_wh
    for req in out:
        if rng.random() < cfg.image_fraction:
            req.images = [
                random_image_url(width, height, rng) for _ in range(cfg.images_per_request)
            ]
    return out


DatasetBuilder = Callable[[BenchConfig, Any, np.random.Generator], list[SampleRequest]]
DATASET_BUILDERS: dict[str, DatasetBuilder] = {
    "random": random_dataset,
    "sharegpt": sharegpt_dataset,
    "prefix": prefix_dataset,
    "random-mm": random_mm_dataset,
}


def build_dataset(cfg: BenchConfig, tokenizer: Any) -> list[SampleRequest]:
    """``cfg.num_prompts`` requests from ``cfg.dataset``, reproducible for ``cfg.seed``."""
    rng = np.random.default_rng([cfg.seed, 1])  # its own stream: arrivals use [seed, 2]
    return DATASET_BUILDERS[cfg.dataset](cfg, tokenizer, rng)
