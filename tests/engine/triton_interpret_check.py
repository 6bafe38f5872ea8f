"""Run as a script with ``TRITON_INTERPRET=1`` (``test_triton_interpret.py`` does): the Triton
kernels of the CUDA path, interpreted on CPU tensors in float32, against torch references;
then the whole engine with the Triton attention backend against transformers.

The interpreter must be chosen before triton decorates the kernels, so this runs in its own
process. Prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.engine.layers import triton_ops  # noqa: E402
from services.engine.layers.norm import RMSNorm  # noqa: E402
from services.engine.layers.rotary import RotaryEmbedding  # noqa: E402
from services.engine.layers.triton_attention import (  # noqa: E402
    TritonAttention,
    paged_decode,
    store_kv,
)
from tests.engine.test_cuda import reference_decode  # noqa: E402


def check_paged_decode() -> None:
    g = torch.Generator().manual_seed(0)
    for heads, kv_heads, head_dim, block_size in [(4, 4, 16, 16), (14, 2, 64, 8), (6, 2, 80, 32)]:
        shape = (40, block_size, kv_heads, head_dim)
        k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        q = torch.randn(4, heads, head_dim, generator=g)
        lens = torch.tensor([1, 0, 70, block_size + 1], dtype=torch.int32)
        width = -(-70 // block_size)
        tables = torch.stack([torch.randperm(40, generator=g)[:width] for _ in range(4)])
        tables = tables.to(torch.int32)
        out = torch.empty_like(q)
        paged_decode(out, q, k_cache, v_cache, tables, lens, head_dim**-0.5)
        ref = reference_decode(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert torch.all(out[1] == 0)
    print("paged_decode ok")


def check_store_kv() -> None:
    k_cache = torch.zeros(8, 4, 2, 16)
    v_cache = torch.zeros_like(k_cache)
    qkv = torch.randn(4, 3 * 32)
    k, v = qkv[:, 32:64].view(4, 2, 16), qkv[:, 64:].view(4, 2, 16)
    store_kv(k, v, k_cache, v_cache, torch.tensor([3, -1, 31, 0]))
    flat_k, flat_v = k_cache.view(-1, 2, 16), v_cache.view(-1, 2, 16)
    for row, slot in ((0, 3), (2, 31), (3, 0)):
        assert torch.equal(flat_k[slot], k[row]) and torch.equal(flat_v[slot], v[row])
    assert int((flat_k.abs().sum(dim=(1, 2)) > 0).sum()) == 3
    print("store_kv ok")


def check_fused_ops() -> None:
    g = torch.Generator().manual_seed(1)
    x, delta = torch.randn(5, 96, generator=g), torch.randn(5, 96, generator=g)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data.normal_(1.0, 0.3, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(triton_ops.rms_norm(x, norm.weight, 1e-6), norm(x))
        total, normed = triton_ops.add_rms_norm(x, delta, norm.weight, 1e-6)
        torch.testing.assert_close(total, x + delta)
        torch.testing.assert_close(normed, norm(x + delta))
    gate_up = torch.randn(3, 2 * 40, generator=g)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(triton_ops.silu_and_mul(gate_up), F.silu(gate) * up)
    rotary = RotaryEmbedding(16, 64, {"rope_type": "default", "rope_theta": 10000.0})
    qkv = torch.randn(3, 10 * 16, generator=g)
    q, k = qkv[:, :96].view(3, 6, 16), qkv[:, 96:128].view(3, 2, 16)
    positions = torch.tensor([0, 5, 63])
    # the CPU path rotates in place (the C kernel, c465bee) as the CUDA one does: give it copies
    want_q, want_k = rotary(positions, q.clone(), k.clone())
    got_q, got_k = triton_ops.rotary_(positions, q.clone(), k.clone(), rotary.cos, rotary.sin)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    print("fused ops ok")


def check_verify_chunks() -> None:
    """Short chunks over a cached context (speculative verifications) through the paged decode
    kernel, one decode row per query row, equal the reference backend's one call per chunk
    (test_short_chunks' cases: groups of 5, 2 and a lone 1 over cached contexts crossing
    blocks; a long chunk and a lone uncached one take the reference path)."""
    from services.engine.layers.attention import AttentionMetadata
    from tests.engine.test_short_chunks import _chunk_kv, _run, _step

    chunks = [(5, 9), (2, 2), (5, 17), (40, 43), (1, 6), (5, 5), (2, 11), (3, 3)]
    q, kc, vc, segs = _step(chunks)
    want = _run(q, kc, vc, segs, grouped=False)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), prefills=segs)
    out = torch.full_like(q, float("nan"))
    k, v = _chunk_kv(kc, segs), _chunk_kv(vc, segs)
    TritonAttention.prefill(q, k, v, kc, vc, meta, 8**-0.5, out)
    assert meta.chunk_plan is not None and all(g.paged is not None for g in meta.chunk_plan[0])
    assert sorted(g.n for g in meta.chunk_plan[0]) == [1, 2, 5]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    print("verify chunks ok")


def check_engine(model_dir: str) -> None:
    """The engine with every attention layer on the Triton backend (paged decode metadata:
    int32 tables, no mask) gives transformers' greedy tokens; speculating (n-gram), its
    verification passes of several query tokens per decoding sequence give the tokens and
    logprobs of the Triton engine without speculation."""
    from services.engine import LLM, SamplingParams
    from services.engine.layers import triton_attention
    from tests.engine.test_correctness import GREEDY, check, hf_greedy, prompts_of_mixed_lengths
    from tests.engine.test_speculative import copy_bias, repetitive_prompts

    prompts = prompts_of_mixed_lengths()
    llm = triton_llm(LLM, model_dir)
    check(llm.generate(prompts, GREEDY), hf_greedy(model_dir, prompts, GREEDY.max_tokens))
    print("engine ok")
    ngram = ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, '
             '"adaptive": false, "disable_by_batch_size": 0}')  # fmt: skip
    spec = triton_llm(LLM, model_dir, speculative_config=ngram)
    # A logit bias keeps the random model within the prompt's tokens: drafts get accepted.
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2,
                            logit_bias=copy_bias())  # fmt: skip
    repeats = repetitive_prompts()[:2]
    calls = []
    real = triton_attention.paged_chunks
    triton_attention.paged_chunks = lambda *a: calls.append(1) or real(*a)
    want, got = llm.generate(repeats, params), spec.generate(repeats, params)
    triton_attention.paged_chunks = real
    assert calls  # the verifications ran in the paged kernel
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids, (g.outputs[0], w.outputs[0])
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4, (a, b)
    stats = spec.engine.scheduler.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens, stats
    print("engine speculating ok")


def triton_llm(llm_class, model_dir: str, **kwargs):
    llm = llm_class(model_dir, dtype="float32", block_size=4, **kwargs)
    runner = llm.engine.runner
    runner.backend = TritonAttention()
    for layer in runner.model.attention_layers:
        layer.backend = runner.backend
    # The CPU decode-step path was built for the torch backend's C kernel: built again, it
    # leaves every layer to the Triton backend (else decodes would bypass the kernels).
    decoder = getattr(runner.model, "model", None)
    if getattr(decoder, "decode_path", None) is not None:
        from services.engine.models.llama_decode import DecodePath

        decoder.decode_path = DecodePath.build(decoder)
        assert decoder.decode_path is None
    return llm


if __name__ == "__main__":
    check_paged_decode()
    check_store_kv()
    check_fused_ops()
    check_verify_chunks()
    if len(sys.argv) > 1:
        check_engine(sys.argv[1])
