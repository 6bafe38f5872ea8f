"""The CUDA path: the Triton paged-attention kernels against a plain torch reference, and the
decode CUDA graphs against eager execution and transformers.

Needs a CUDA device and triton (skipped otherwise). ``test_correctness.py`` runs its greedy /
chunked / prefix-cache / preemption / KV hand-off checks on CUDA as well, with and without
graphs.
"""

from __future__ import annotations

import pytest
import torch

from services.engine import LLM, SamplingParams
from tests.engine.test_correctness import hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def reference_decode(q, k_cache, v_cache, tables, lens, scale):
    """Softmax attention of each row's query over its first ``lens[i]`` cached tokens."""
    b, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    out = torch.zeros_like(q, dtype=torch.float32)
    for i in range(b):
        n = int(lens[i])
        if n == 0:
            continue
        blocks = tables[i, : -(-n // bs)].long()
        k = k_cache[blocks].reshape(-1, hkv, d)[:n].float().repeat_interleave(h // hkv, 1)
        v = v_cache[blocks].reshape(-1, hkv, d)[:n].float().repeat_interleave(h // hkv, 1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [(4, 4, 64, 16), (14, 2, 64, 16), (32, 8, 128, 16), (12, 2, 128, 32), (8, 1, 80, 8)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_matches_reference(heads, kv_heads, head_dim, block_size, dtype):
    from services.engine.layers.triton_attention import paged_decode

    g = torch.Generator(device="cuda").manual_seed(0)
    num_blocks, b = 64, 6
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g, device="cuda").to(dtype)
    v_cache = torch.randn(shape, generator=g, device="cuda").to(dtype)
    q = torch.randn(b, heads, head_dim, generator=g, device="cuda").to(dtype)
    # Lengths across tile and block edges, one padded (empty) row; tables in random order.
    lens = torch.tensor([1, block_size, 63, 64, 0, 300], dtype=torch.int32, device="cuda")
    width = -(-300 // block_size)
    tables = torch.stack(
        [torch.randperm(num_blocks, generator=g, device="cuda")[:width] for _ in range(b)]
    ).to(torch.int32)
    out = torch.empty_like(q)
    scale = head_dim**-0.5
    paged_decode(out, q, k_cache, v_cache, tables, lens, scale)
    ref = reference_decode(q, k_cache, v_cache, tables, lens, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    assert torch.all(out[4] == 0)


def test_store_kv_skips_negative_slots():
    from services.engine.layers.triton_attention import store_kv

    k_cache = torch.zeros(8, 4, 2, 16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    # k and v as strided views of one fused projection, as the models produce them.
    qkv = torch.randn(5, 3 * 2 * 16, device="cuda")
    k = qkv[:, 32:64].view(5, 2, 16)
    v = qkv[:, 64:].view(5, 2, 16)
    slots = torch.tensor([3, -1, 31, 0, -1], device="cuda")
    store_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 16), v_cache.view(-1, 2, 16)
    for row, slot in ((0, 3), (2, 31), (3, 0)):
        assert torch.equal(flat_k[slot], k[row]) and torch.equal(flat_v[slot], v[row])
    assert int((flat_k.abs().sum(dim=(1, 2)) > 0).sum()) == 3


def staggered_requests(n: int, seed: int = 1):
    """Prompts of many lengths with different output lengths: as requests finish, the decode
    batch passes through sizes between the captured ones (padded replays)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 49000, (int(m),), generator=g).tolist() for m in range(3, 3 + n)]
    params = [
        SamplingParams(temperature=0, max_tokens=4 + (i * 7) % 23, ignore_eos=True, logprobs=1)
        for i in range(n)
    ]
    return prompts, params


def test_graph_replays_match_transformers(tiny_model_dir):
    """21 concurrent requests finishing at different steps: every batch size from 21 down to 1
    is replayed from a padded graph; tokens equal transformers' and the eager CUDA path's."""
    model = tiny_model_dir("qwen2")
    prompts, params = staggered_requests(21)
    graphs = LLM(str(model), device="cuda", dtype="float32", kv_cache_bytes=16 << 20)
    replays = 0
    inner = graphs.engine.runner.graphs.run

    def counting_run(*args):
        nonlocal replays
        hidden = inner(*args)
        replays += hidden is not None
        return hidden

    graphs.engine.runner.graphs.run = counting_run
    got = graphs.generate(prompts, params)
    assert replays >= max(p.max_tokens for p in params) - 1
    eager = LLM(
        str(model), device="cuda", dtype="float32", kv_cache_bytes=16 << 20, enforce_eager=True
    ).generate(prompts, params)
    longest = max(p.max_tokens for p in params)
    refs = hf_greedy(model, prompts, longest)
    for out, ref_out, p, (ref_tokens, ref_lps) in zip(got, eager, params, refs, strict=True):
        tokens = out.outputs[0].token_ids
        assert tokens == ref_tokens[: p.max_tokens]
        assert tokens == ref_out.outputs[0].token_ids
        for lp, ref in zip(out.outputs[0].logprobs, ref_lps, strict=False):
            assert abs(lp.logprob - ref) < 1e-4


def test_a_layer_hook_keeps_decode_steps_on_the_graphs(tiny_model_dir):
    """Every worker that can prefill sets a layer hook (the KV push). It is called for the
    steps that compute prompt tokens, and decode-only steps still replay the graphs (they
    never did while a hook was set: every mixed and prefill worker decoded eagerly)."""
    model = tiny_model_dir("qwen2")
    prompts, params = staggered_requests(4)
    llm = LLM(str(model), device="cuda", dtype="float32", kv_cache_bytes=16 << 20)
    hooked_steps: list[bool] = []  # per hook call on layer 0: whether a prompt token ran
    llm.engine.layer_hook = lambda layer, scheduled: (
        layer == 0
        and hooked_steps.append(
            any(s.seq.num_computed_tokens < s.seq.num_prompt_tokens for s in scheduled)
        )
    )
    replays = 0
    inner = llm.engine.runner.graphs.run

    def counting_run(*args):
        nonlocal replays
        hidden = inner(*args)
        replays += hidden is not None
        return hidden

    llm.engine.runner.graphs.run = counting_run
    got = llm.generate(prompts, params)
    assert hooked_steps and all(hooked_steps)
    assert replays >= max(p.max_tokens for p in params) - 1
    eager = LLM(
        str(model), device="cuda", dtype="float32", kv_cache_bytes=16 << 20, enforce_eager=True
    ).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in eager]


def test_bfloat16_graphs_agree_with_eager(tiny_model_dir):
    """In bfloat16 the graph and eager paths run the same kernels on different padded shapes:
    the first tokens agree and logprobs stay close."""
    model = str(tiny_model_dir("llama"))
    prompts, params = staggered_requests(9, seed=2)
    kw = dict(device="cuda", dtype="bfloat16", kv_cache_bytes=16 << 20)
    graphs = LLM(model, **kw).generate(prompts, params)
    eager = LLM(model, enforce_eager=True, **kw).generate(prompts, params)
    for a, b in zip(graphs, eager, strict=True):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        assert ta[:2] == tb[:2]
        same = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y), len(ta))
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs[:same], strict=False):
            assert abs(la.logprob - lb.logprob) < 0.05


def test_sampling_on_cuda_matches_cpu(tiny_model_dir):
    """Seeded sampling with penalties and logprobs goes through the CPU rows of the sampler:
    the same draws as a CPU engine on the same (float32) model."""
    model = str(tiny_model_dir("llama"))
    prompts, _ = staggered_requests(4, seed=3)
    params = SamplingParams(
        temperature=0.8, top_p=0.9, seed=5, max_tokens=8, ignore_eos=True, presence_penalty=0.5
    )
    cuda = LLM(model, device="cuda", dtype="float32", kv_cache_bytes=16 << 20)
    cpu = LLM(model, device="cpu", dtype="float32")
    got = [o.outputs[0].token_ids for o in cuda.generate(prompts, params)]
    want = [o.outputs[0].token_ids for o in cpu.generate(prompts, params)]
    assert got == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_match_torch(dtype):
    """The fused kernels against the torch code they replace (``fused.ops`` off)."""
    import torch.nn.functional as F

    from services.engine.layers import fused, triton_ops
    from services.engine.layers.norm import RMSNorm
    from services.engine.layers.rotary import RotaryEmbedding

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(7, 896, generator=g, device="cuda").to(dtype)
    delta = torch.randn(7, 896, generator=g, device="cuda").to(dtype)
    norm = RMSNorm(896, 1e-6).cuda().to(dtype)
    norm.weight.data.normal_(1.0, 0.3, generator=g)
    qkv = torch.randn(7, (14 + 2 + 2) * 64, generator=g, device="cuda").to(dtype)
    q, k = qkv[:, : 14 * 64].view(7, 14, 64), qkv[:, 14 * 64 : 16 * 64].view(7, 2, 64)
    positions = torch.tensor([0, 1, 17, 100, 511, 3, 200], device="cuda")
    rotary = RotaryEmbedding(64, 512, {"rope_type": "default", "rope_theta": 1e6})
    rotary.build(torch.device("cuda"))
    gate_up = torch.randn(7, 2 * 4864, generator=g, device="cuda").to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)

    def run_modules():
        return (
            norm(x),
            *norm.add_forward(x, delta),
            *rotary(positions, q.clone(), k.clone()),
        )

    saved = fused.ops
    try:
        fused.ops = triton_ops  # whatever EPDSERVE_FUSED_KERNELS says
        fast = (*run_modules(), triton_ops.silu_and_mul(gate_up))
        fused.ops = None  # the torch path of the same modules
        slow = (*run_modules(), F.silu(gate) * up)
    finally:
        fused.ops = saved
    for a, b in zip(fast, slow, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:  # at most one rounding step apart
            torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=8e-3)
