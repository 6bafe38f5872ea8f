"""The fused elementwise C kernels (``layers/cpu_fused.py``) against the torch paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from services.engine.layers import cpu_fused, native
from services.engine.layers.norm import RMSNorm
from services.engine.layers.rotary import RotaryEmbedding


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("EPDSERVE_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
    native.forget("fused_elementwise")
    k = cpu_fused.ops()
    if k is None:
        mp.undo()
        pytest.skip("no C compiler here: the kernels are not built (the torch path runs)")
    yield k
    mp.undo()


def _torch_norm(x, w, eps):
    xf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf


# Row counts on both sides of the one-thread threshold (2^17 elements).
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_rms_norm_and_residual_add_match_torch(ops, rows):
    gen = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 600, generator=gen) * 3
    x = wide[:, :576]  # a column slice: rows 600 floats apart
    delta = torch.randn(rows, 576, generator=gen)
    w = torch.randn(576, generator=gen)
    x_before, delta_before = x.clone(), delta.clone()
    _, normed = ops.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(normed, _torch_norm(x, w, 1e-5), rtol=2e-6, atol=2e-6)
    total, normed = ops.rms_norm(x, w, 1e-5, delta)
    assert torch.equal(total, x + delta)  # the add is exact
    torch.testing.assert_close(normed, _torch_norm(x + delta, w, 1e-5), rtol=2e-6, atol=2e-6)
    assert torch.equal(x, x_before) and torch.equal(delta, delta_before)  # inputs untouched


def test_rms_norm_module_takes_the_kernel_and_keeps_extremes_finite(ops, monkeypatch):
    norm = RMSNorm(8, 1e-6)
    calls = []
    real = ops.rms_norm
    monkeypatch.setattr(ops, "rms_norm", lambda *a: calls.append(1) or real(*a))
    x = torch.tensor([[1e-38] * 8, [1e30] * 8, [0.0] * 8])
    out = norm(x)
    assert calls  # the module went through the kernel
    torch.testing.assert_close(out, _torch_norm(x, norm.weight.detach(), 1e-6))
    total, h = norm.add_forward(x, x)
    assert torch.equal(total, x + x) and torch.isfinite(h).all()


@pytest.mark.parametrize("rows", [1, 64, 200])
def test_silu_mul_matches_torch(ops, rows):
    gen = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1536, generator=gen) * 8
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -87.5])  # the exp's clamps
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    got = ops.silu_mul(gate_up)
    torch.testing.assert_close(got, ref, rtol=3e-6, atol=1e-6)
    nan = torch.full((1, 4), math.nan)
    assert torch.isnan(ops.silu_mul(nan)).all()


@pytest.mark.parametrize("t", [1, 64, 400])
def test_rotary_in_place_matches_torch_on_qkv_views(ops, t):
    heads, kv_heads, d = 9, 3, 64
    rope = RotaryEmbedding(d, 2048, {"rope_type": "default", "rope_theta": 100000.0})
    gen = torch.Generator().manual_seed(t)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=gen)
    positions = torch.randint(0, 2048, (t,), generator=gen)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k = q.view(t, heads, d), k.view(t, kv_heads, d)
    cos = rope.cos[positions].unsqueeze(1)
    sin = rope.sin[positions].unsqueeze(1)

    def ref(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    q_ref, k_ref, v_before = ref(q), ref(k), v.clone()
    q2, k2 = rope(positions, q, k)
    assert q2.data_ptr() == q.data_ptr()  # in place, in the qkv buffer
    torch.testing.assert_close(q2, q_ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(k2, k_ref, rtol=1e-5, atol=2e-6)
    assert torch.equal(v, v_before)


def test_rotary_position_outside_the_tables_is_an_error(ops):
    rope = RotaryEmbedding(8, 16, {"rope_type": "default"})
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    before = q.clone()
    with pytest.raises(ValueError, match="outside the rotary tables"):
        ops.rotary_(torch.tensor([3, 16]), q, k, rope.cos, rope.sin)
    assert torch.equal(q, before)  # checked before anything is written


@pytest.mark.parametrize("n", [1, 36_864, 300_001])  # a decode batch; past the threshold
def test_add_in_place_is_exact(ops, n):
    gen = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    ref = x + y
    assert ops.add_(x, y) is x
    assert torch.equal(x, ref)
    strided = torch.randn(4, 6)[:, :3]  # not contiguous: torch's add_
    ref = strided + 1
    assert torch.equal(ops.add_(strided, torch.ones(4, 3)), ref)


def test_the_mlp_keeps_torch_silu_where_the_kernel_does_not_vectorize(ops, monkeypatch):
    """GCC 12 vectorizes the silu loop only with AVX-512: built for AVX2 it ran 5x slower than
    torch, so the MLP takes torch's silu there, with the same values. Fails on the old code:
    the MLP called the kernel on every CPU."""
    from types import SimpleNamespace

    from services.engine.models.llama import LlamaMLP

    lib = native.library("fused_elementwise")
    for flags, vectorized in (("fma avx2 avx512f", True), ("fma avx2", False)):
        monkeypatch.setattr(native, "cpu_flags", lambda f=flags: f)
        assert cpu_fused.CpuFused(lib).silu_vectorized is vectorized
    torch.manual_seed(0)
    mlp = LlamaMLP(SimpleNamespace(hidden_size=32, intermediate_size=64, hidden_act="silu"))
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(4, 32)
    calls: list[int] = []
    real = ops.silu_mul
    monkeypatch.setattr(ops, "silu_mul", lambda g: calls.append(1) or real(g))
    outs = []
    for vectorized in (True, False):
        monkeypatch.setattr(ops, "silu_vectorized", vectorized)
        with torch.no_grad():
            outs.append(mlp(x))
    assert calls == [1]  # the kernel with AVX-512 only
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def _qkv_views(t, heads, kv_heads, d, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=gen)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return q.view(t, heads, d), k.view(t, kv_heads, d), v.view(t, kv_heads, d), gen


@pytest.mark.parametrize("t", [1, 64, 400])  # a decode batch; past the threshold
def test_rotary_store_equals_rotary_then_the_kv_write(ops, t):
    """One C pass: q and k rotated in place and the rotated k and v in the cache at their
    slots, exactly as ``rotary_`` then ``attention.store_kv``; other slots untouched. Fails on
    the old code: no ``rotary_store_``."""
    from services.engine.layers.attention import store_kv

    heads, kv_heads, d, blocks, bs = 9, 3, 64, 40, 16
    rope = RotaryEmbedding(d, 2048, {"rope_type": "default", "rope_theta": 100000.0})
    q, k, v, gen = _qkv_views(t, heads, kv_heads, d, t)
    positions = torch.randint(0, 2048, (t,), generator=gen)
    slots = torch.randperm(blocks * bs, generator=gen)[:t]
    kc, vc = (
        torch.randn(blocks, bs, kv_heads, d, generator=gen),
        torch.randn(blocks, bs, kv_heads, d),
    )
    q_ref, k_ref = ops.rotary_(positions, q.clone(), k.clone(), rope.cos, rope.sin)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv(k_ref, v, kc_ref, vc_ref, slots)
    assert rope.rotate_and_store(positions, q, k, v, kc, vc, slots)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_rotary_store_refuses_a_slot_outside_the_cache(ops):
    rope = RotaryEmbedding(8, 16, {"rope_type": "default"})
    q, k, v, _ = _qkv_views(2, 2, 1, 8, 0)
    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    before = q.clone()
    with pytest.raises(IndexError, match="outside the cache"):
        ops.rotary_store_(torch.tensor([1, 2]), q, k, v, rope.cos, rope.sin, kc, vc,
                          torch.tensor([3, 8]))  # fmt: skip
    assert torch.equal(q, before) and not kc.any() and not vc.any()  # checked first
    # Not float32 caches: the caller keeps rotary + store_kv.
    assert not rope.rotate_and_store(torch.tensor([1, 2]), q, k, v, kc.double(), vc.double(),
                                     torch.tensor([0, 1]))  # fmt: skip


def test_the_attention_layer_writes_its_kv_in_the_rotary_pass(ops, monkeypatch):
    """A Llama attention layer on the CPU: the backend makes no KV write of its own, and the
    output and caches are those of rotary + ``store_kv``. Fails on the old code: the backend
    wrote the cache (2 writes)."""
    from types import SimpleNamespace

    from services.engine.layers import attention
    from services.engine.layers.attention import AttentionMetadata, PrefillSegment, TorchAttention
    from services.engine.models.llama import LlamaAttention

    cfg = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    torch.manual_seed(0)
    layer = LlamaAttention(cfg, TorchAttention(torch.device("cpu")), False, False)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rope = RotaryEmbedding(16, 64, {"rope_type": "default"})
    writes: list[int] = []
    real = attention.store_kv
    monkeypatch.setattr(attention, "store_kv", lambda *a: writes.append(1) or real(*a))
    x, positions = torch.randn(5, 64), torch.arange(5)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(RotaryEmbedding, "rotate_and_store", lambda *a: False)
        layer.k_cache, layer.v_cache = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([4, 5, 6, 7, 8]),
            prefills=[PrefillSegment(0, 5, 5, torch.tensor([1, 2]))],
        )
        with torch.no_grad():
            results.append((layer(positions, x, rope, meta), layer.k_cache, layer.v_cache))
        assert len(writes) == (0 if fused else 1)
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_argmax_gives_torchs_indices(ops):
    """The first of equal maxima, the first NaN where a row has one, +-0 and infinities as
    torch.argmax; rows of a wider matrix; both sides of the one-thread threshold."""
    gen = torch.Generator().manual_seed(5)
    cases = [torch.randn(64, 49152, generator=gen), torch.randn(3, 1, generator=gen)]
    ties = torch.randn(40, 3000, generator=gen).round()
    nans = torch.randn(40, 3000, generator=gen)
    nans[torch.rand(40, 3000, generator=gen) < 0.01] = float("nan")
    infs = torch.full((9, 700), float("-inf"))
    infs[torch.rand(9, 700, generator=gen) < 0.1] = float("inf")
    zeros = torch.zeros(5, 100)
    zeros[:, ::3] = -0.0
    wide = torch.randn(7, 1000, generator=gen)[:, :999]
    for x in [*cases, ties, nans, infs, zeros, wide]:
        assert ops.argmax(x) == x.argmax(dim=-1).tolist()


def test_the_greedy_sampler_takes_the_kernel(ops, monkeypatch):
    from services.engine.sampler import Sampler
    from services.engine.sampling_params import SamplingParams
    from services.engine.sequence import Sequence

    calls = []
    fn = ops._argmax
    monkeypatch.setattr(ops, "_argmax", lambda *a: calls.append(a[1]) or fn(*a))
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(6))
    seqs = [Sequence(f"r{i}", [1, 2], SamplingParams(temperature=0)) for i in range(3)]
    out = Sampler(eos_token_ids={0})(logits, seqs)
    assert calls == [3] and out.token_ids == logits.argmax(dim=-1).tolist()
