"""Tensor parallelism: two ranks (two processes, gloo) give the tokens and logprobs of one,
through chunked prefill, prefix-cache hits, preemption and speculative decoding; a dead rank
ends the group."""

from __future__ import annotations

import os
import signal
import time

import pytest

from services.engine import LLM
from services.engine.distributed import RankFailure
from tests.engine.test_correctness import GREEDY, check, hf_greedy, prompts_of_mixed_lengths
from tests.engine.test_speculative import Oracle, speculating


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def tp_case(request, tiny_model_dir):
    """(references, a TP=2 engine with 7-token chunks, 4-token blocks and room for about two
    long sequences per rank)."""
    model = tiny_model_dir(request.param)
    refs = hf_greedy(model, prompts_of_mixed_lengths(), GREEDY.max_tokens)
    kwargs = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=7)
    probe = LLM(str(model), **kwargs)
    per_block = probe.engine.runner.bytes_per_block // 2  # a rank holds half the KV heads
    del probe
    llm = LLM(str(model), **kwargs, kv_cache_bytes=per_block * 24, tensor_parallel_size=2)
    yield refs, llm
    llm.engine.close()


def test_tp2_matches_single_device(tp_case):
    refs, llm = tp_case
    engine = llm.engine
    assert engine.runner.tp.size == 2 and engine.runner.num_kv_heads == 1
    first = llm.generate(prompts_of_mixed_lengths(), GREEDY)
    check(first, refs)
    assert engine.scheduler.num_preemptions > 0
    # The cache holds about two sequences: hits come from running a prompt again at once.
    prompt = prompts_of_mixed_lengths()[3]
    for _ in range(2):
        again = llm.generate([prompt], GREEDY)
        check(again, refs[3:4])
    assert again[0].num_cached_tokens >= 28
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_tp2_verifies_drafts(tp_case):
    """Speculative decoding: the driver proposes (drafts from transformers' output, one token
    wrong in most), every rank verifies them with several query tokens per sequence, and the
    tokens and logprobs stay transformers' through preemption and chunked prefill."""
    refs, llm = tp_case
    engine = llm.engine
    prompts = prompts_of_mixed_lengths()
    oracle = Oracle()
    for prompt, (tokens, _) in zip(prompts, refs, strict=True):
        oracle.refs[(tuple(prompt), 0)] = tokens
    s = speculating(engine, oracle, num_speculative_tokens=3)
    try:
        check(llm.generate(prompts, GREEDY), refs)
    finally:
        engine.scheduler.speculator = None
    assert 0 < s.stats.num_accepted_tokens < s.stats.num_draft_tokens
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_dead_rank_ends_the_group(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), device="cpu", dtype="float32", tensor_parallel_size=2)
    ranks = llm.engine.runner.ranks
    assert ranks is not None
    out = llm.generate(prompts_of_mixed_lengths()[:1], GREEDY)
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens
    # Calls run a function on every other rank (PD's per-rank KV push is set up this way):
    # its answers come back in rank order, its exceptions are raised here.
    assert ranks.call(getattr, "rank", timeout=30) == [1]
    with pytest.raises(AttributeError, match="no_such_field"):
        ranks.call(getattr, "no_such_field", timeout=30, background=True)
    os.kill(ranks.procs[0].pid, signal.SIGKILL)
    ranks.procs[0].join(timeout=10)
    # An idle engine learns it from the watcher (the step thread asks between steps) ...
    deadline = time.monotonic() + 10
    while ranks.dead is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(RankFailure, match="rank 1 exited"):
        llm.engine.executor.check_health()
    with pytest.raises(RankFailure):
        ranks.call(getattr, "rank", timeout=30)
    # ... and a step never runs on half a group.
    with pytest.raises(RankFailure):
        llm.generate(prompts_of_mixed_lengths()[:1], GREEDY)
    llm.engine.close()
