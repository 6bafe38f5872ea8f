"""The causal prefill attention kernel (``csrc/prefill_attn.c``) against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.engine.layers import native, prefill_kernel
from services.engine.layers.attention import AttentionMetadata, PrefillSegment, TorchAttention


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("EPDSERVE_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
    native.forget("prefill_attn")
    k = prefill_kernel.prefill_attention()
    yield k if k is not None else pytest.skip("no C compiler here: SDPA runs")
    mp.undo()


def _qkv(heads, kv_heads, d, lens, seed=0):
    """q, k, v as the layer has them: views into one fused qkv output (rows wider than H x D)."""
    t = sum(lens)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=torch.Generator().manual_seed(seed))
    q = qkv[:, : heads * d].view(t, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return q, k, v, list(zip(starts, lens, strict=True))


def _sdpa(q, k, v, segments, scale):
    out = torch.empty(q.shape)
    for s, n in segments:
        qq, kk, vv = (x[s : s + n].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
        out[s : s + n] = o[0].transpose(0, 1)
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,d,lens",
    [
        (9, 3, 64, [128, 128, 128]),  # the default model's prompts of the offline benchmark
        (9, 3, 64, [1, 2, 5, 17, 33, 100, 300, 600]),  # past one key chunk (256), ragged
        (4, 4, 128, [7, 129, 513]),  # no GQA, head_dim 128
        (14, 2, 64, [50, 257]),  # a group of 7 (Qwen2-0.5B)
        (32, 8, 128, [3, 64]),  # Llama-8B's heads
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_kernel_matches_sdpa(kernel, heads, kv_heads, d, lens, threads):
    q, k, v, segs = _qkv(heads, kv_heads, d, lens)
    out = torch.full(q.shape, float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernel(q, k, v, segs, d**-0.5, out)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, _sdpa(q, k, v, segs, d**-0.5), rtol=1e-5, atol=2e-6)


def test_the_backend_attends_fresh_prompts_in_one_kernel_call(kernel, monkeypatch):
    """All fresh prompts of a prefill step, of any lengths, in one call of the kernel; a chunk
    after a cached prefix keeps SDPA over its gathered blocks."""
    heads, kv_heads, d, bs = 9, 3, 64, 16
    q, k, v, segs = _qkv(heads, kv_heads, d, [40, 40, 36, 34])
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.randn(8, bs, kv_heads, d, generator=gen)
    v_cache = torch.randn(8, bs, kv_heads, d, generator=gen)
    prefills = [PrefillSegment(s, n, n, torch.tensor([0, 1, 2])) for s, n in segs[:3]]
    prefills.append(PrefillSegment(segs[3][0], 34, 40, torch.tensor([5, 6, 7])))
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), prefills=prefills)
    calls, sdpa_calls = [], []
    fn, sdpa = kernel.fn, F.scaled_dot_product_attention
    monkeypatch.setattr(kernel, "fn", lambda *a: calls.append(a[6]) or fn(*a))
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa_calls.append(1) or sdpa(*a, **kw))  # fmt: skip
    out = torch.empty(q.shape)
    TorchAttention.prefill(q, k, v, k_cache, v_cache, meta, 0.125, out)
    assert calls == [3] and sdpa_calls == [1]  # three prompts in one call; the cached one alone
    torch.testing.assert_close(out[:116], _sdpa(q, k, v, segs[:3], 0.125)[:116],
                               rtol=1e-5, atol=2e-6)  # fmt: skip


def test_bad_segments_and_the_off_switch(kernel, monkeypatch):
    q, k, v, segs = _qkv(9, 3, 64, [10, 10])
    out = torch.empty(q.shape)
    with pytest.raises(ValueError, match="do not fit"):
        kernel(q, k, v, [(0, 10), (10, 11)], 0.125, out)
    with pytest.raises(ValueError, match="do not fit"):
        kernel(q, k, v, [(0, 0)], 0.125, out)
    assert not kernel.usable(q[:, :, :32], k[:, :, :32], v[:, :, :32], out[:, :, :32])
    monkeypatch.setenv("EPDSERVE_CPU_PREFILL_ATTN", "0")
    assert prefill_kernel.prefill_attention() is None
