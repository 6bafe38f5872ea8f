"""Speculative decoding in the engine: output equal to the engine without it (and so to
transformers), token for token, whatever the drafts; every sampling feature at every
verified position; preemption, chunked prefill, prefix caching, n > 1, migration and a PD
hand-off with speculation on; no block leaks."""

from __future__ import annotations

import json
import random

import pytest
import torch

from services.engine import LLM, SamplingParams, StructuredOutputsParams
from services.engine.llm_engine import LLMEngine
from services.engine.resume import Resume
from services.engine.sequence import Sequence
from services.engine.speculative.config import SpeculativeConfig
from services.engine.speculative.speculator import Speculator
from tests.conftest import TINY_KV_BYTES
from tests.engine.test_correctness import (
    MAX_TOKENS,
    hf_greedy,
    kv_handoff,
    prompts_of_mixed_lengths,
)


class Oracle:
    """Proposes the reference output (what the engine without speculation produced) with
    one token made wrong at a position that cycles through the draft, so that every number
    of accepted tokens, 0 to k, occurs."""

    def __init__(self) -> None:
        self.refs: dict[tuple[tuple[int, ...], int], list[int]] = {}
        self.calls = 0

    def propose(self, seq: Sequence, k: int) -> list[int]:
        ref = self.refs.get((tuple(seq.prompt_token_ids), seq.index), [])
        draft = list(ref[seq.num_output_tokens : seq.num_output_tokens + k])
        self.calls += 1
        wrong = self.calls % (k + 2)  # k or k + 1: the whole draft is right
        if wrong < len(draft):
            draft[wrong] = (draft[wrong] + 1) % 49152
        return draft

    def finished(self, seq: Sequence) -> None:
        pass


def speculating(engine: LLMEngine, proposer=None, **config) -> Speculator:
    """Give ``engine`` a speculator (fixed length, every batch size), with ``proposer``."""
    cfg = SpeculativeConfig(adaptive=False, disable_by_batch_size=0, **config)
    spec = Speculator(cfg, engine.max_model_len, engine.block_manager)
    if proposer is not None:
        spec.proposer = proposer
    engine.scheduler.speculator = spec
    return spec


def run(engine: LLMEngine, prompts, params, resume: Resume | None = None):
    """Every request to the end: [(index, token ids, text, finish, stop, logprobs)] each."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    acc: dict[str, dict[int, list]] = {}
    for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
        rid = f"r{i}-{random.random()}"
        engine.add_request(rid, prompt, p, resume=resume)
        acc[rid] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None
            for c in out.outputs:
                cur = acc[out.request_id].setdefault(c.index, [[], "", None, None, []])
                cur[0] += c.token_ids
                cur[1] += c.text
                cur[2], cur[3] = c.finish_reason, c.stop_reason
                cur[4] += [(lp.token_id, lp.logprob) for lp in c.logprobs or []]
    engine.block_manager.check_invariants()
    return [sorted((i, *map(_tuple, v)) for i, v in acc[rid].items()) for rid in acc]


def _tuple(x):
    return tuple(x) if isinstance(x, list) else x


def same(got, want) -> None:
    """Equal outputs: tokens, text, finish and stop reasons exactly, logprobs to 1e-4."""
    assert [[c[:5] for c in r] for r in got] == [[c[:5] for c in r] for r in want]
    for r, w in zip(got, want, strict=True):
        for c, d in zip(r, w, strict=True):
            assert [t for t, _ in c[5]] == [t for t, _ in d[5]]
            assert [lp for _, lp in c[5]] == pytest.approx([lp for _, lp in d[5]], abs=1e-4)


@pytest.fixture(scope="module")
def spec(model) -> LLMEngine:
    return LLM(model, dtype="float32", block_size=4, kv_cache_bytes=TINY_KV_BYTES).engine


def repetitive_prompts() -> list[list[int]]:
    """Prompts with repeats (n-gram and suffix matches) next to random ones."""
    g = torch.Generator().manual_seed(3)
    unit = torch.randint(10, 49000, (7,), generator=g).tolist()
    return [unit * 5, (unit[:3] + [99]) * 6, *prompts_of_mixed_lengths()[:4]]


def test_greedy_equals_transformers(model, spec):
    """Drafts from transformers' own greedy output, one token wrong in most of them."""
    prompts = repetitive_prompts()
    refs = hf_greedy(model, prompts, MAX_TOKENS)
    oracle = Oracle()
    for prompt, (tokens, _) in zip(prompts, refs, strict=True):
        oracle.refs[(tuple(prompt), 0)] = tokens
    s = speculating(spec, oracle, num_speculative_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    for outs, (tokens, lps) in zip(run(spec, prompts, params), refs, strict=True):
        assert outs[0][1] == tuple(tokens)
        assert [lp for _, lp in outs[0][5]] == pytest.approx(lps, abs=1e-4)
    assert 0 < s.stats.num_accepted_tokens < s.stats.num_draft_tokens


def copy_bias() -> dict[int, float]:
    """A logit bias that keeps the output within the first prompt's 7 tokens."""
    return {t: 100.0 for t in set(repetitive_prompts()[0])}


# A suffix budget smaller than the three prompts' tries together: the running requests' tries
# slide past their first tokens and evict each other, the outputs kept are cut.
TINY_SUFFIX = {"suffix_max_depth": 4, "suffix_max_request_tokens": 12,
               "suffix_max_worker_tokens": 24}  # fmt: skip


@pytest.mark.parametrize("method", ["ngram", "suffix", "suffix_tiny_budget"])
def test_real_proposers_equal_no_speculation(model, plain, method):
    """The n-gram and suffix proposers through ``speculative_config``. A logit bias keeps
    the random model's output within a few tokens, so that it repeats and drafts from
    earlier text get accepted (and rejected)."""
    prompts = repetitive_prompts()[:3]
    bias = copy_bias()
    params = {
        "ngram": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logit_bias=bias),
        "suffix": SamplingParams(temperature=1.0, seed=2, max_tokens=24, ignore_eos=True,
                                 logit_bias=bias),
        "suffix_tiny_budget": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                             logit_bias=bias),
    }[method]  # fmt: skip
    cfg = {"method": method.split("_")[0], "num_speculative_tokens": 3, "disable_by_batch_size": 0}
    if method == "suffix_tiny_budget":
        cfg.update(TINY_SUFFIX)
    llm = LLM(model, dtype="float32", block_size=4, kv_cache_bytes=TINY_KV_BYTES,
              speculative_config=json.dumps(cfg))  # fmt: skip
    same(run(llm.engine, prompts, params), run(plain, prompts, params))
    stats = llm.engine.stats().spec
    assert stats is not None
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    if method == "suffix_tiny_budget":
        proposer = llm.engine.scheduler.speculator.proposer
        assert proposer.evictions > 0 and proposer.tokens <= 24


STRUCTURED = StructuredOutputsParams(regex=r"(ab|cd)[a-z ]{3,12}x")
CASES = {
    "greedy_logprobs": SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3),
    "seeded_sampling": SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11,
                                      max_tokens=16, ignore_eos=True, logprobs=2),
    "penalties": SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                presence_penalty=0.8, frequency_penalty=0.5,
                                repetition_penalty=1.3, min_tokens=12),
    "logit_bias": SamplingParams(temperature=0.7, seed=3, max_tokens=16, ignore_eos=True,
                                 logit_bias={3000: 4.0, 4000: 3.0, 5000: -100}),
    "n2_seeded": SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True),
    "structured": SamplingParams(temperature=0.8, seed=9, max_tokens=24,
                                 structured_outputs=STRUCTURED),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_equals_no_speculation(plain, spec, name):
    """Drafts right and wrong at every position: penalties, bias, grammar masks, seeded
    draws and logprobs come out exactly as without speculation."""
    params = CASES[name]
    prompts = repetitive_prompts()[:4]
    want = run(plain, prompts, params)
    oracle = Oracle()
    for prompt, outs in zip(prompts, want, strict=True):
        for index, tokens, *_ in outs:
            oracle.refs[(tuple(prompt), index)] = list(tokens)
    s = speculating(spec, oracle, num_speculative_tokens=4)
    same(run(spec, prompts, params), want)
    assert 0 < s.stats.num_accepted_tokens < s.stats.num_draft_tokens
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def test_stops_inside_an_accepted_run(plain, spec):
    """Stop token ids, stop strings and max_tokens end the sequence at the first token that
    finishes it, even with right drafts after it."""
    prompts = repetitive_prompts()[2:5]
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = run(plain, prompts, base)
    oracle = Oracle()
    for prompt, outs in zip(prompts, full, strict=True):
        oracle.refs[(tuple(prompt), 0)] = list(outs[0][1])
    tokens, text = full[0][0][1], full[0][0][2]
    cases = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[tokens[6]]),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[text[len(text) // 2 :][:3]]),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
    ]  # fmt: skip
    for params in cases:
        want = run(plain, prompts, params)
        s = speculating(spec, oracle, num_speculative_tokens=6)
        oracle.calls = 0  # whole drafts right at the start
        same(run(spec, prompts, params), want)
        assert s.stats.num_accepted_tokens > 0


class Exact(Oracle):
    """Proposes the reference output itself: every draft right."""

    def propose(self, seq: Sequence, k: int) -> list[int]:
        ref = self.refs.get((tuple(seq.prompt_token_ids), seq.index), [])
        return list(ref[seq.num_output_tokens : seq.num_output_tokens + k])


def test_eos_inside_an_accepted_run(plain, spec):
    """The model's EOS token ends the sequence where it is sampled, with right drafts after
    it in the same verification (the drafts come from the run that ignored EOS), and does
    not before ``min_tokens``: both as without speculation."""
    prompts = repetitive_prompts()[2:5]
    full = run(plain, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    oracle = Exact()
    for prompt, outs in zip(prompts, full, strict=True):
        oracle.refs[(tuple(prompt), 0)] = list(outs[0][1])
    tokens = full[0][0][1]
    at = next(i for i in range(2, 6) if tokens[i] not in tokens[:i])  # its first occurrence
    eos = tokens[at]
    added = eos not in plain.eos_token_ids
    for engine in (plain, spec):  # NOTE: the sampler and the output check share this set
        engine.eos_token_ids.add(eos)
    try:
        for params in [SamplingParams(temperature=0, max_tokens=20),
                       SamplingParams(temperature=0, max_tokens=20, min_tokens=at + 2)]:  # fmt: skip
            want = run(plain, prompts, params)
            s = speculating(spec, oracle, num_speculative_tokens=6)
            same(run(spec, prompts, params), want)
            assert s.stats.num_accepted_tokens > 0
            if params.min_tokens == 0:  # the first output ends at the EOS, with "stop"
                assert want[0][0][1] == tuple(tokens[: at + 1]) and want[0][0][3] == "stop"
            else:
                assert len(want[0][0][1]) > at + 1
    finally:
        if added:
            for engine in (plain, spec):
                engine.eos_token_ids.discard(eos)


def test_preemption_chunked_prefill_and_prefix_cache(model, plain):
    """A cache too small for the batch (preemption by recompute), prompts chunked across
    steps and sharing cached prefixes, each with speculation on."""
    prompts = prompts_of_mixed_lengths()
    prompts = prompts + [prompts[4][:40] + p for p in prompts[:3]]
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=14, ignore_eos=True)
    want = run(plain, prompts, params)
    per_block = plain.runner.bytes_per_block
    small = LLM(model, dtype="float32", block_size=4, kv_cache_bytes=per_block * 28,
                max_num_batched_tokens=24).engine  # fmt: skip
    oracle = Oracle()
    for prompt, outs in zip(prompts, want, strict=True):
        oracle.refs[(tuple(prompt), 0)] = list(outs[0][1])
    s = speculating(small, oracle, num_speculative_tokens=4)
    same(run(small, prompts, params), want)
    assert small.scheduler.num_preemptions > 0
    assert small.block_manager.hit_tokens > 0
    assert s.stats.num_accepted_tokens > 0
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_resumed_request_speculates(plain, spec):
    """Migration: a request resumed from another worker's tokens speculates here and ends
    as the undisturbed request."""
    prompt = repetitive_prompts()[1]
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=16, ignore_eos=True)
    ref = run(plain, [prompt], params)[0][0][1]
    oracle = Oracle()
    oracle.refs[(tuple(prompt), 0)] = list(ref)
    s = speculating(spec, oracle, num_speculative_tokens=4)
    got = run(spec, [prompt], params, resume=Resume(tuple(ref[:5])))[0][0][1]
    assert tuple(ref[:5]) + got == tuple(ref)
    assert s.stats.num_drafts > 0


def test_pd_decode_side_speculates(model, plain, spec):
    """The prefill engine samples the first token and hands the KV over; the decode engine
    speculates from there (drafts need only the target's KV: nothing else moves)."""
    prompt = repetitive_prompts()[0]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logit_bias=copy_bias())
    ref = run(plain, [prompt], params)[0][0][1]
    first_params = SamplingParams(temperature=0, max_tokens=1, logit_bias=copy_bias())
    spec.block_manager.reset_prefix_cache()
    s = speculating(spec, num_speculative_tokens=4)  # the real n-gram proposer
    assert tuple(kv_handoff(plain, spec, prompt, first_params, params)) == ref
    assert s.stats.num_accepted_tokens > 0
    spec.block_manager.check_invariants()


def test_per_request_opt_out(spec):
    s = speculating(spec, num_speculative_tokens=4)
    prompt = repetitive_prompts()[0]
    params = {"temperature": 0, "max_tokens": 16, "logit_bias": copy_bias()}
    run(spec, [prompt], SamplingParams(**params, speculative=False))
    assert s.stats.num_drafts == 0
    run(spec, [prompt], SamplingParams(**params))
    assert s.stats.num_drafts > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "speculative_config"),
        ('{"method": "eagle"}', "method"),
        ('{"num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"prompt_lookup_min": 5, "prompt_lookup_max": 4}', "prompt_lookup_min"),
        ('{"speculative_model": "x"}', "unknown"),
        ("[1]", "object"),
        # Values of the wrong JSON type passed the bounds: 4.5 failed at start-up ([0] * 4.5),
        # a float depth in the first speculating step (a slice), "no" was true.
        ('{"num_speculative_tokens": 4.5}', "num_speculative_tokens must be int"),
        ('{"method": "suffix", "suffix_max_depth": 1e9}', "suffix_max_depth must be int"),
        ('{"adaptive": "no"}', "adaptive must be bool"),
        ('{"disable_by_batch_size": true}', "disable_by_batch_size must be int"),
        ('{"draft_token_cost": NaN}', "draft_token_cost must be float"),
        ('{"method": "eagle3", "model": 5}', "model must be str"),
        # About depth trie nodes per token: 10**9 was an O(n**2) trie of a long prompt.
        ('{"method": "suffix", "suffix_max_depth": 1000000000}', "suffix_max_depth must be in"),
    ],
)
def test_bad_config_is_a_value_error(text, message):
    from services.engine.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=text)


def test_draft_length_defaults_by_method():
    """16 for the model-free proposers, 4 where each draft token costs a draft pass."""
    assert SpeculativeConfig(method="ngram").num_speculative_tokens == 16
    assert SpeculativeConfig.parse('{"method": "suffix"}').num_speculative_tokens == 16
    assert SpeculativeConfig(method="eagle3", model="h").num_speculative_tokens == 4
    assert SpeculativeConfig(method="ngram", num_speculative_tokens=3).num_speculative_tokens == 3
