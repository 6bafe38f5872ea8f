"""Datasets: random lengths within --range-ratio, ShareGPT loading, shared-prefix groups."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from services.bench.config import BenchConfig
from services.bench.datasets import build_dataset, count_tokens, length_range, load_sharegpt

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "benchmarks" / "data" / "sharegpt_sample.json"
URL = "http://127.0.0.1:1"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def cfg(**kw) -> BenchConfig:
    return BenchConfig(base_url=URL, **kw)


def test_length_range() -> None:
    assert length_range(100, 0.0) == (100, 100)
    assert length_range(100, 0.25) == (75, 125)
    assert length_range(10, 0.33) == (6, 14)  # floor / ceil: the window is never narrower
    assert length_range(1, 0.9) == (1, 2)  # never below one token


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_random_lengths_within_range_ratio(tokenizer, ratio: float) -> None:
    c = cfg(dataset="random", num_prompts=40, input_len=64, output_len=20, range_ratio=ratio)
    reqs = build_dataset(c, tokenizer)
    assert len(reqs) == 40
    in_lo, in_hi = length_range(64, ratio)
    out_lo, out_hi = length_range(20, ratio)
    for r in reqs:
        # The count recorded is the real count of the text that will be sent.
        assert r.prompt_len == count_tokens(tokenizer, r.prompt)
        assert in_lo <= r.prompt_len <= in_hi
        assert out_lo <= r.output_len <= out_hi
        assert r.system is None and r.full_text == r.prompt
    if ratio == 0.0:
        assert {r.prompt_len for r in reqs} == {64} and {r.output_len for r in reqs} == {20}
    else:  # the window is used, not just its middle
        assert len({r.prompt_len for r in reqs}) > 5 and len({r.output_len for r in reqs}) > 5


def test_random_is_reproducible_per_seed(tokenizer) -> None:
    a = build_dataset(cfg(num_prompts=5, input_len=16, output_len=4, seed=3), tokenizer)
    b = build_dataset(cfg(num_prompts=5, input_len=16, output_len=4, seed=3), tokenizer)
    c = build_dataset(cfg(num_prompts=5, input_len=16, output_len=4, seed=4), tokenizer)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert len({r.prompt for r in a}) == 5


def test_sample_file_is_up_to_date() -> None:
    gen = REPO / "scripts" / "gen_sharegpt_sample.py"
    proc = subprocess.run([sys.executable, str(gen), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_load_sharegpt_skips_malformed_entries() -> None:
    pairs = load_sharegpt(SAMPLE)
    assert len(pairs) == 64  # 66 entries, two without a reply
    assert all(p and r for p, r in pairs)


def test_sharegpt_dataset(tokenizer) -> None:
    reqs = build_dataset(
        cfg(dataset="sharegpt", dataset_path=str(SAMPLE), num_prompts=20), tokenizer
    )
    replies = dict(load_sharegpt(SAMPLE))
    assert len(reqs) == 20 and len({r.prompt for r in reqs}) == 20
    for r in reqs:
        assert r.prompt_len == count_tokens(tokenizer, r.prompt) >= 4
        assert r.output_len == count_tokens(tokenizer, replies[r.prompt])  # the reply's length
    fixed = build_dataset(
        cfg(dataset="sharegpt", dataset_path=str(SAMPLE), num_prompts=5, output_len=7), tokenizer
    )
    assert {r.output_len for r in fixed} == {7}


def test_sharegpt_too_few_conversations(tokenizer) -> None:
    with pytest.raises(ValueError, match="only 64 usable"):
        build_dataset(cfg(dataset="sharegpt", dataset_path=str(SAMPLE), num_prompts=65), tokenizer)


def test_prefix_groups_share_the_prefix(tokenizer) -> None:
    c = cfg(dataset="prefix", num_prompts=12, prefix_groups=3, prefix_len=48, input_len=8,
            output_len=5)  # fmt: skip
    reqs = build_dataset(c, tokenizer)
    groups: dict[int, list] = defaultdict(list)
    for r in reqs:
        assert r.group is not None and r.system is not None
        groups[r.group].append(r)
    assert sorted(groups) == [0, 1, 2] and all(len(g) == 4 for g in groups.values())
    systems = {g: {r.system for r in rs} for g, rs in groups.items()}
    assert all(len(s) == 1 for s in systems.values())  # one prefix per group ...
    assert len({next(iter(s)) for s in systems.values()}) == 3  # ... and different groups
    for rs in groups.values():
        # The server sees the same leading tokens: what a prefix cache can reuse.
        prefix_ids = tokenizer.encode(rs[0].system, add_special_tokens=False)
        assert abs(len(prefix_ids) - 48) <= 2
        for r in rs:
            full = tokenizer.encode(r.full_text, add_special_tokens=False)
            assert full[: len(prefix_ids)] == prefix_ids
            assert r.prompt_len == len(full) > len(prefix_ids)
            assert r.output_len == 5
    # Shuffled: the groups interleave instead of arriving one block after another.
    order = [r.group for r in reqs]
    assert order != sorted(order)
