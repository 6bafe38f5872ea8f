"""The model-based proposers (a draft model, an EAGLE-3 head) with n > 1 and structured
outputs: greedy output equal to no speculation (every one of n, and under a grammar), and
seeded sampled output under a grammar reproducible run to run and accepted by the grammar."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from services.engine import LLM, SamplingParams, StructuredOutputsParams
from tests.engine.test_speculative import copy_bias, repetitive_prompts, run, same
from tests.engine.test_speculative_draft import KV_BYTES, build_eagle3_head

REGEX = r"(ab|cd)[a-z ]{3,12}x"


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def plain(model):
    return LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES).engine


@pytest.fixture(scope="module", params=["draft_model", "eagle3"])
def engine(request, model, tiny_model_dir, tmp_path_factory):
    if request.param == "eagle3":
        bias = copy_bias()
        vocab = sorted(set(range(100, 4100 - len(bias))) | set(bias))
        draft = build_eagle3_head(model, tmp_path_factory.mktemp("eagle3"), vocab)
    else:
        draft = str(tiny_model_dir("qwen2"))
    cfg = {"method": request.param, "model": draft, "num_speculative_tokens": 3,
           "disable_by_batch_size": 0, "adaptive": False}  # fmt: skip
    return LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES,
               speculative_config=json.dumps(cfg)).engine  # fmt: skip


def test_greedy_n_and_grammar_equal_no_speculation(engine, plain):
    prompts = repetitive_prompts()[:3]
    before = engine.stats().spec.num_draft_tokens
    for params in (
        SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True, logit_bias=copy_bias()),
        SamplingParams(temperature=0, max_tokens=24,
                       structured_outputs=StructuredOutputsParams(regex=REGEX)),
    ):  # fmt: skip
        same(run(engine, prompts, params), run(plain, prompts, params))
    assert engine.stats().spec.num_draft_tokens > before
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_seeded_n_under_a_grammar_is_reproducible(engine):
    prompts = repetitive_prompts()[:2]
    params = SamplingParams(n=2, temperature=0.8, seed=9, max_tokens=24,
                            structured_outputs=StructuredOutputsParams(regex=REGEX))  # fmt: skip
    first = run(engine, prompts, params)
    assert run(engine, prompts, dataclasses.replace(params)) == first
    for outs in first:
        assert len(outs) == 2
        for choice in outs:
            assert re.fullmatch(REGEX, choice[2]), choice[2]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
