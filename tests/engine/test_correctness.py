"""Greedy tokens and logprobs of the engine equal a transformers reference, token for token."""

from __future__ import annotations

import pytest
import torch

from services.engine import LLM, SamplingParams
from tests.conftest import FAMILIES, TINY_KV_BYTES

MAX_TOKENS = 12

GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# "cuda" replays CUDA graphs for decode batches; "cuda-eager" runs the Triton kernels eagerly.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=GPU_MARKS),
    pytest.param("cuda-eager", marks=GPU_MARKS),
]


def on(device: str, **kwargs) -> dict:
    """LLM arguments for a test device, with a small KV budget: on CUDA several engines share
    the device; on the CPU the default 1 GiB, zeroed at start, costs each engine ~2 s of CPU
    (and ~10 s of wall time at load 16), where 16 MiB holds ~32k tokens of a tiny model."""
    if device == "cpu":
        return {"device": "cpu", "kv_cache_bytes": TINY_KV_BYTES, **kwargs}
    return {
        "device": "cuda",
        "enforce_eager": device == "cuda-eager",
        "kv_cache_bytes": 16 << 20,
        **kwargs,
    }


def prompts_of_mixed_lengths(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 5, 17, 33, 64, 3]
    return [torch.randint(10, 49000, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model_dir, prompts: list[list[int]], max_tokens: int):
    """Reference: transformers forward passes over the whole sequence, argmax each step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            logprobs = []
            for _ in range(max_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                lp = torch.log_softmax(logits, dim=-1)
                tok = int(lp.argmax())
                logprobs.append(float(lp[tok]))
                ids.append(tok)
            results.append((ids[len(prompt) :], logprobs))
    return results


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = hf_greedy(
                tiny_model_dir(family), prompts_of_mixed_lengths(), MAX_TOKENS
            )
        return cache[family]

    return get


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)


def check(outputs, refs) -> None:
    for out, (ref_tokens, ref_lps) in zip(outputs, refs, strict=True):
        got = out.outputs[0]
        assert got.token_ids == ref_tokens
        assert len(got.logprobs) == MAX_TOKENS
        for lp, ref in zip(got.logprobs, ref_lps, strict=True):
            assert abs(lp.logprob - ref) < 1e-4
            assert lp.top[0].token_id == lp.token_id


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(tiny_model_dir, references, family, device):
    llm = LLM(str(tiny_model_dir(family)), **on(device, dtype="float32", kv_cache_bytes=8 << 20))
    assert (llm.engine.runner.graphs is not None) == (device == "cuda")
    check(llm.generate(prompts_of_mixed_lengths(), GREEDY), references(family))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_chunked_prefill_matches(tiny_model_dir, references, family, device):
    llm = LLM(str(tiny_model_dir(family)), **on(device, dtype="float32", max_num_batched_tokens=7))
    check(llm.generate(prompts_of_mixed_lengths(), GREEDY), references(family))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefix_cache_hits_match(tiny_model_dir, references, family, device):
    llm = LLM(str(tiny_model_dir(family)), **on(device, dtype="float32", block_size=4))
    prompts = prompts_of_mixed_lengths()
    first = llm.generate(prompts, GREEDY)
    second = llm.generate(prompts, GREEDY)
    check(first, references(family))
    check(second, references(family))
    assert sum(o.num_cached_tokens for o in second) > 0.8 * sum(len(p) for p in prompts[1:])
    assert llm.engine.block_manager.hit_rate > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_preemption_matches(tiny_model_dir, references, family, device):
    llm = LLM(str(tiny_model_dir(family)), **on(device, dtype="float32", block_size=4))
    per_block = llm.engine.runner.bytes_per_block
    # Room for about two long sequences at a time: the batch must preempt to finish.
    small = LLM(
        str(tiny_model_dir(family)),
        **on(device, dtype="float32", block_size=4, kv_cache_bytes=per_block * 24),
    )
    check(small.generate(prompts_of_mixed_lengths(), GREEDY), references(family))
    assert small.engine.scheduler.num_preemptions > 0
    small.engine.block_manager.check_invariants()
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks
    del llm


def test_n_completions_share_prompt_blocks(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), **on("cpu", dtype="float32", block_size=4))
    prompt = prompts_of_mixed_lengths()[4]  # 64 tokens
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    # Same seed, same completions.
    again = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    # The prompt was computed once: the children found its blocks in the cache.
    bm = llm.engine.block_manager
    assert bm.hit_tokens >= 2 * (len(prompt) // 4 - 1) * 4


@pytest.mark.parametrize("device", DEVICES)
def test_kv_export_import_between_engines(tiny_model_dir, references, device):
    """Prefill on engine A (KV held), copy the blocks into engine B, continue decoding on B:
    tokens equal a single-engine run."""
    model = str(tiny_model_dir("llama"))
    a = LLM(model, **on(device, dtype="float32", block_size=4))
    b = LLM(model, **on(device, dtype="float32", block_size=4))
    prompts = prompts_of_mixed_lengths()
    refs = references("llama")
    for i, prompt in enumerate(prompts):
        rid = f"req-{i}"
        a.engine.add_request(
            rid, prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=3), hold_kv=True
        )
        first = None
        while a.engine.has_unfinished_requests():
            for out in a.engine.step():
                first = out.outputs[0]
        blocks, computed = a.engine.held_blocks(rid)
        assert computed == len(prompt)
        data = a.engine.read_kv(blocks)
        a.engine.release_held(rid)

        dst, cached = b.engine.reserve(rid, prompt, GREEDY)
        skip = cached // 4
        b.engine.write_kv(dst[skip:], data[:, :, skip : len(dst)])
        tokens = list(
            b.engine.start_reserved(rid, first.token_ids[0], first.logprobs[0]).outputs[0].token_ids
        )
        while b.engine.has_unfinished_requests():
            for out in b.engine.step():
                tokens.extend(out.outputs[0].token_ids)
        assert tokens == refs[i][0]
    for engine in (a.engine, b.engine):
        engine.block_manager.check_invariants()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_seeded_sampling_survives_kv_handoff(tiny_model_dir):
    """PD with temperature sampling and a seed: the decode engine continues the generator
    where the prefill engine's first draw left it, so tokens equal a one-engine run."""
    model = str(tiny_model_dir("llama"))
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=10, ignore_eos=True)
    prompt = prompts_of_mixed_lengths()[3]
    expected = LLM(model, **on("cpu", block_size=4)).generate([prompt], params)[0].outputs[0]
    a, b = (LLM(model, **on("cpu", block_size=4)).engine for _ in range(2))
    first_params = SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=1)
    assert kv_handoff(a, b, prompt, first_params, params) == expected.token_ids


def kv_handoff(a, b, prompt, first_params: SamplingParams, params: SamplingParams) -> list[int]:
    """PD in one process: engine ``a`` computes the prompt and samples the first token with
    ``first_params``, its KV is copied into a reservation on ``b`` (whose prefix cache must
    not hold the prompt), which generates the rest; returns every token."""
    a.add_request("r", prompt, first_params, hold_kv=True)
    first = None
    while a.has_unfinished_requests():
        for out in a.step():
            first = out.outputs[0].token_ids[0]
    blocks, _ = a.held_blocks("r")
    data = a.read_kv(blocks)
    a.release_held("r")
    dst, cached = b.reserve("r", prompt, params)
    assert cached == 0
    b.write_kv(dst, data[:, :, : len(dst)])
    tokens = list(b.start_reserved("r", first).outputs[0].token_ids)
    while b.has_unfinished_requests():
        for out in b.step():
            tokens.extend(out.outputs[0].token_ids)
    return tokens


def test_prefill_capped_beside_decodes_matches(tiny_model_dir, family="llama"):
    """max_prefill_tokens_while_decoding: a 64-token prompt chunked 4 tokens a step beside 8
    running decodes (issue 17's ITL tail) gives the reference's tokens and logprobs, and so
    do the decodes beside it."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 49000, (n,), generator=g).tolist() for n in [3] * 8 + [64]]
    llm = LLM(str(tiny_model_dir(family)), **on("cpu", dtype="float32", max_num_batched_tokens=40,
                                               max_prefill_tokens_while_decoding=4))  # fmt: skip
    sched, beside = llm.engine.scheduler, []
    schedule = sched.schedule

    def recording():
        out = schedule()
        decodes = sum(1 for s in out.scheduled if s.seq.num_output_tokens)
        if decodes:
            beside.append(out.num_batched_tokens - decodes)
        return out

    sched.schedule = recording
    check(llm.generate(prompts, GREEDY), hf_greedy(tiny_model_dir(family), prompts, MAX_TOKENS))
    assert beside[:3] == [4, 4, 4]  # the long prompt's chunks beside the 8 decodes
