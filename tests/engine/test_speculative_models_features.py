"""The model-based proposers (a draft model, an EAGLE-3 head) with n > 1 and structured
outputs: greedy output equal to no speculation (every one of n, and under a grammar), and
seeded sampled output under a grammar reproducible run to run and accepted by the grammar."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from services.engine import LLM, SamplingParams, StructuredOutputsParams
from tests.engine.conftest import KV_BYTES
from tests.engine.test_speculative import copy_bias, repetitive_prompts, run, same
from tests.engine.test_speculative_draft import biased_eagle3_head

REGEX = r"(ab|cd)[a-z ]{3,12}x"


@pytest.fixture(scope="module", params=["draft_model", "eagle3"])
def engine(request, model, tiny_model_dir, tmp_path_factory):
    if request.param == "eagle3":
        draft = biased_eagle3_head(model, tmp_path_factory.mktemp("eagle3"))
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


def test_draft_model_catches_up_a_long_context_in_chunks(model, plain, monkeypatch):
    """A context the draft's cache lacks (here a 35-token prompt against a step budget of 16,
    co-located and through PD) is computed at most 16 positions a pass, with no drafts until
    it is caught up: before, the first decode ran the draft over the whole prompt in one
    pass. The target as its own draft still accepts nearly every draft (the KV is right)."""
    from services.engine.model_runner import ModelRunner
    from tests.engine.test_correctness import kv_handoff

    real = ModelRunner.execute
    sizes: list[int] = []

    def spy(self, batch, *args, **kwargs):
        if self.num_layers == 2 and getattr(self, "_is_draft", False):
            sizes.extend(s.num_new_tokens for s in batch)
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "execute", spy)
    cfg = {"method": "draft_model", "model": model, "num_speculative_tokens": 3,
           "disable_by_batch_size": 0, "adaptive": False}  # fmt: skip
    engines = [LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES,
                   max_num_batched_tokens=16, speculative_config=json.dumps(cfg)).engine
               for _ in range(2)]  # fmt: skip
    for e in engines:
        e.executor.drafter.runner._is_draft = True
    prompt = repetitive_prompts()[0]  # 35 tokens
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = run(plain, [prompt], params)[0][0][1]
    sizes.clear()
    assert run(engines[0], [prompt], params)[0][0][1] == ref
    assert sizes[:2] == [16, 16] and max(sizes) == 16, sizes
    sizes.clear()
    first = SamplingParams(temperature=0, max_tokens=1)
    assert tuple(kv_handoff(plain, engines[1], prompt, first, params)) == ref
    assert sizes[:2] == [16, 16] and max(sizes) == 16, sizes
    for e in engines:
        stats = e.stats().spec
        assert stats.num_draft_tokens > 5 and stats.acceptance_rate > 0.9, stats
        assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
