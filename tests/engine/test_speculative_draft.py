"""Draft-model speculation: greedy output equal to the engine without speculation with a
different random draft and with the target as its own draft (which must accept almost every
draft); seeded sampling reproducible run to run; preemption and chunked prefill; no block
leaks. (The min(1, p/q) rule's distribution: test_speculative_sampling.py.)"""

from __future__ import annotations

import json

import pytest

from services.engine import LLM, SamplingParams
from services.engine.config import EngineConfig
from tests.engine.test_correctness import prompts_of_mixed_lengths
from tests.engine.test_speculative import copy_bias, repetitive_prompts, run, same

KV_BYTES = 4 << 20  # each engine's target cache (and its draft's, of as many blocks)


def draft_engine(target: str, draft: str, k: int = 3, **kwargs):
    cfg = {"method": "draft_model", "model": draft, "num_speculative_tokens": k,
           "disable_by_batch_size": 0, "adaptive": False}  # fmt: skip
    kwargs.setdefault("kv_cache_bytes", KV_BYTES)
    return LLM(target, dtype="float32", block_size=4, speculative_config=json.dumps(cfg),
               **kwargs).engine  # fmt: skip


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def draft(tiny_model_dir) -> str:
    """Another random model of another family, with the same tokenizer."""
    return str(tiny_model_dir("qwen2"))


@pytest.fixture(scope="module")
def plain(model):
    return LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES).engine


def test_greedy_equals_no_speculation(model, draft, plain):
    """A logit bias keeps both models' output within a few tokens, so that some drafts of
    the unrelated draft model are accepted and some rejected."""
    prompts = repetitive_prompts()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                            logit_bias=copy_bias(), logprobs=2)  # fmt: skip
    engine = draft_engine(model, draft)
    same(run(engine, prompts, params), run(plain, prompts, params))
    stats = engine.stats().spec
    assert stats is not None
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_target_as_its_own_draft_accepts_all(model, plain):
    prompts = prompts_of_mixed_lengths()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine = draft_engine(model, model, k=4)
    same(run(engine, prompts, params), run(plain, prompts, params))
    stats = engine.stats().spec
    assert stats is not None and stats.num_draft_tokens > 50
    assert stats.acceptance_rate > 0.95, stats


def test_seeded_sampling_is_reproducible(model):
    """With the p/q rule seeded tokens differ from those without speculation, but not from
    run to run (n = 2 children, each with its own draft draws)."""
    prompts = repetitive_prompts()[:3]
    params = SamplingParams(n=2, temperature=0.9, top_p=0.95, seed=7, max_tokens=16,
                            ignore_eos=True, logit_bias=copy_bias())  # fmt: skip
    engine = draft_engine(model, model, k=3)
    first = run(engine, prompts, params)
    engine.block_manager.reset_prefix_cache()
    assert run(engine, prompts, params) == first
    assert first[0][0][1] != first[0][1][1]  # the two children differ
    stats = engine.stats().spec
    assert stats is not None
    # Same weights, same temperature: q == p up to rounding, almost every draft is kept.
    assert stats.acceptance_rate > 0.9, stats


def test_preemption_and_chunked_prefill(model, plain):
    """A cache too small for the batch: sequences are preempted (their draft KV rebuilt on
    new blocks) and prompts chunked; greedy output unchanged, every block back."""
    prompts = prompts_of_mixed_lengths()
    prompts = prompts + [prompts[4][:40] + p for p in prompts[:3]]
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    want = run(plain, prompts, params)
    per_block = plain.runner.bytes_per_block
    small = draft_engine(
        model, model, k=4, kv_cache_bytes=per_block * 28, max_num_batched_tokens=24
    )
    same(run(small, prompts, params), want)
    assert small.scheduler.num_preemptions > 0
    stats = small.stats().spec
    assert stats is not None and stats.acceptance_rate > 0.9, stats
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_draft_model_config_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a 'model'"):
        EngineConfig(speculative_config='{"method": "draft_model"}')
    with pytest.raises(ValueError, match="needs a 'model'"):
        EngineConfig(speculative_config='{"method": "ngram", "model": "x"}')
