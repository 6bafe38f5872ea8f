"""The C kernels of ``layers/native.py`` against the torch reference paths they replace."""

from __future__ import annotations

import pytest
import torch

from services.engine.layers import cpu_fused, native
from services.engine.layers.attention import AttentionMetadata, TorchAttention
from services.engine.layers.masks import additive_mask


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("EPDSERVE_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
    native.forget()
    k = native.paged_decode()
    if k is None:
        pytest.skip("no C compiler here: the kernel is not built (the torch path runs)")
    return k


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _paged_case(batch, heads, kv_heads, head_dim, block_size, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum((n + block_size - 1) // block_size for n in lens) + 7
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    max_blocks = max((n + block_size - 1) // block_size for n in lens)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(batch, max_blocks, dtype=torch.long)  # padded with 0, as the runner
    i = 0
    for b, n in enumerate(lens):
        nb = (n + block_size - 1) // block_size
        tables[b, :nb] = torch.tensor(perm[i : i + nb])
        i += nb
    q = torch.randn(batch, heads, head_dim, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.long)


def _reference(q, k_cache, v_cache, tables, lens, scale):
    """The SDPA path over gathered, padded blocks (TorchAttention without the kernel)."""
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decodes=q.shape[0],
        decode_block_tables=tables,
        decode_context_lens=lens,
        decode_mask=additive_mask(lens, tables.shape[1] * k_cache.shape[1], q.dtype)[:, None, None],
    )
    out = torch.empty_like(q)
    TorchAttention().decode(q, k_cache, v_cache, meta, scale, out)
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size,lens",
    [
        (9, 3, 64, 16, [130, 1, 16, 17, 191, 64]),  # the default model's shapes
        (4, 4, 128, 16, [5, 33]),  # no GQA, head_dim 128
        (8, 2, 40, 8, [1, 7, 8, 9, 100]),  # a head_dim with no specialised loop
        (9, 3, 64, 4, [1, 2, 3, 5, 37, 64, 65, 100]),  # blocks shorter than a score vector
        (9, 3, 64, 16, [150] * 12 + [3, 200]),  # whole sequences shared out by their tokens
        (2, 1, 64, 1, [1000, 5]),  # one token a block; one long context beside a short one
    ],
)
def test_paged_decode_matches_sdpa(kernel, heads, kv_heads, head_dim, block_size, lens):
    q, kc, vc, tables, ctx = _paged_case(len(lens), heads, kv_heads, head_dim, block_size, lens)
    scale = head_dim**-0.5
    ref = _reference(q, kc, vc, tables, ctx, scale)
    out = torch.full_like(q, float("nan"))
    kernel(q, kc, vc, tables, ctx, max(lens), scale, out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


def test_paged_decode_runs_in_the_backend(kernel):
    """A CPU backend uses the kernel for decodes, with no padding mask in the metadata."""
    backend = TorchAttention(torch.device("cpu"))
    assert backend.native_decode is kernel and not backend.decode_mask_needed
    q, kc, vc, tables, ctx = _paged_case(3, 9, 3, 64, 16, [40, 3, 77])
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decodes=3,
        decode_block_tables=tables,
        decode_context_lens=ctx,
        decode_max_len=77,
    )
    out = torch.empty_like(q)
    backend.decode(q, kc, vc, meta, 0.125, out)
    torch.testing.assert_close(out, _reference(q, kc, vc, tables, ctx, 0.125))


def test_paged_decode_refuses_bad_input(kernel):
    """A block id outside the cache or a length past the table is an error, not a read out
    of bounds."""
    q, kc, vc, tables, ctx = _paged_case(2, 9, 3, 64, 16, [20, 30])
    out = torch.empty_like(q)
    bad = tables.clone()
    bad[1, 0] = kc.shape[0]
    with pytest.raises(RuntimeError, match="paged decode kernel failed"):
        kernel(q, kc, vc, bad, ctx, 30, 0.125, out)
    with pytest.raises(RuntimeError, match="paged decode kernel failed"):
        kernel(q, kc, vc, tables, torch.tensor([20, 33]), 33, 0.125, out)


def test_kernel_off_switch(monkeypatch):
    monkeypatch.setenv("EPDSERVE_CPU_KERNELS", "0")
    assert native.library("paged_decode") is None
    assert TorchAttention(torch.device("cpu")).native_decode is None


def test_fresh_prompts_of_one_length_attend_in_one_call(monkeypatch):
    """Prompts without a cached prefix, back to back, of one length: one SDPA call for them
    all, with the values of one call per prompt; a different length and a chunk after a
    cached prefix keep calls of their own."""
    from services.engine.layers.attention import PrefillSegment

    heads, kv_heads, d, bs = 6, 2, 16, 16
    gen = torch.Generator().manual_seed(3)
    # Three fresh prompts of 40, one of 36 (longer than short_chunks.MAX_TOKENS: shorter ones
    # are batched there), then a chunk of 34 after a cached prefix of 6.
    lens = [40, 40, 40, 36]
    t = sum(lens) + 34
    q, k, v = (torch.randn(t, h, d, generator=gen) for h in (heads, kv_heads, kv_heads))
    k_cache = torch.randn(8, bs, kv_heads, d, generator=gen)
    v_cache = torch.randn(8, bs, kv_heads, d, generator=gen)
    segs, start = [], 0
    for n in lens:
        segs.append(PrefillSegment(start, n, n, torch.tensor([0, 1, 2])))
        start += n
    segs.append(PrefillSegment(start, 34, 40, torch.tensor([5, 6, 7])))
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), prefills=segs)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda qq, *a, **kw: calls.append(qq.shape[0]) or sdpa(qq, *a, **kw))  # fmt: skip
    out = torch.empty_like(q)
    TorchAttention.prefill(q, k, v, k_cache, v_cache, meta, 0.25, out)
    assert sorted(calls) == [1, 1, 3]  # the three 40s together; the 36 and the cached one alone
    for seg in segs[:4]:
        s, n = seg.start, seg.num_tokens
        ref = sdpa(q[s : s + n].transpose(0, 1)[None], k[s : s + n].transpose(0, 1)[None],
                   v[s : s + n].transpose(0, 1)[None], is_causal=True, scale=0.25,
                   enable_gqa=True)[0].transpose(0, 1)  # fmt: skip
        torch.testing.assert_close(out[s : s + n], ref, rtol=0, atol=1e-6)


def test_a_query_view_into_the_qkv_output_still_takes_the_kernel(kernel, monkeypatch):
    """Rotary in place leaves q a view into the fused qkv output (rows wider than H x D): the
    decode copies it and takes the kernel (it fell back to gather + SDPA before)."""
    q, k_cache, v_cache, tables, lens = _paged_case(3, 6, 2, 64, 16, [5, 40, 17])
    wide = torch.zeros(3, 10 * 64)
    wide[:, : 6 * 64] = q.reshape(3, -1)
    view = wide[:, : 6 * 64].view(3, 6, 64)
    assert not view.is_contiguous()
    calls = []
    fn = kernel.fn
    monkeypatch.setattr(kernel, "fn", lambda *a: calls.append(1) or fn(*a))
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decodes=3,
                             decode_block_tables=tables, decode_context_lens=lens,
                             decode_max_len=40)  # fmt: skip
    backend = TorchAttention(torch.device("cpu"))
    backend.native_decode = kernel
    out = torch.empty(3, 6, 64)
    backend.decode(view, k_cache, v_cache, meta, 0.125, out)
    assert calls == [1]
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, tables, lens, 0.125),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.fixture(scope="module", params=["native", "avx2"])
def builds(request, kernel, monkeypatch_module):
    """The paged decode library as this CPU builds it, and built for AVX2 alone
    (``-march=x86-64-v3``: CI machines may lack AVX-512); each with the fused kernels."""
    if request.param == "native":
        yield kernel, cpu_fused.ops()
        return
    if not {"avx2", "fma", "bmi2"} <= set(native.cpu_flags().split()):
        pytest.skip("an x86-64-v3 build would not run on this CPU")  # SIGILL, not a failure
    flags = ["-O3", "-march=x86-64-v3", "-mprefer-vector-width=256", "-fopenmp", "-shared",
             "-fPIC", "-std=gnu11"]  # fmt: skip
    monkeypatch_module.setattr(native, "_compile_flags", lambda cpu: flags)
    native.forget()
    k, ops = native.paged_decode(), cpu_fused.ops()
    monkeypatch_module.setattr(native, "_compile_flags", native._compile_flags)
    native.forget()  # the next module gets this CPU's build again
    assert k is not None and ops is not None
    yield k, ops


def _qkv_case(lens, heads, kv_heads, head_dim, block_size, seed=1):
    q, kc, vc, tables, ctx = _paged_case(
        len(lens), heads, kv_heads, head_dim, block_size, lens, seed
    )
    gen = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(len(lens), width, generator=gen)
    positions = ctx - 1
    # Each sequence's last slot: where its new token's K and V go.
    slots = torch.tensor([int(tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for b, n in enumerate(lens)])  # fmt: skip
    return qkv, kc, vc, tables, ctx, positions, slots


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size,lens",
    [
        (9, 3, 64, 16, [130, 1, 16, 17, 191, 64]),
        (4, 4, 128, 16, [5, 33]),
        (8, 2, 40, 8, [1, 7, 8, 9, 100]),
        (9, 3, 64, 16, [150] * 12 + [3, 200]),
    ],
)
def test_rotary_store_attend_equals_the_two_calls_bit_for_bit(
    builds, heads, kv_heads, head_dim, block_size, lens
):
    """The decode step's one call a layer (rotary + KV write + paged attention) computes what
    CpuFused.rotary_store_ and then the kernel compute: the same q, caches and output bits.
    Fails on the old code: there was no such call."""
    from services.engine.layers.rotary import RotaryEmbedding

    kernel, ops = builds
    rotary = RotaryEmbedding(head_dim, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    rotary.build()
    qkv, kc, vc, tables, ctx, pos, slots = _qkv_case(lens, heads, kv_heads, head_dim, block_size)
    scale = head_dim**-0.5
    # The two calls, on copies.
    qkv2, kc2, vc2 = qkv.clone(), kc.clone(), vc.clone()
    q, k, v = qkv2.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(len(lens), heads, head_dim)
    k = k.view(len(lens), kv_heads, head_dim)
    v = v.view(len(lens), kv_heads, head_dim)
    ops.rotary_store_(pos, q, k, v, rotary.cos, rotary.sin, kc2, vc2, slots)
    ref = torch.empty(len(lens), heads, head_dim)
    kernel(q.contiguous(), kc2, vc2, tables, ctx, max(lens), scale, ref)
    out = torch.full((len(lens), heads * head_dim), float("nan"))
    kernel.rotary_store_attend(pos, qkv, heads, rotary.cos, rotary.sin, kc, vc, slots, tables,
                               ctx, max(lens), scale, out)  # fmt: skip
    assert torch.equal(out.view_as(ref), ref)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(qkv[:, : heads * head_dim], qkv2[:, : heads * head_dim])


def test_rotary_store_attend_refuses_bad_input_before_writing(kernel):
    """A position past the tables, a slot past the cache, a block id or length out of range,
    or qkv rows of the wrong width: an error, and nothing written (q and the caches)."""
    from services.engine.layers.rotary import RotaryEmbedding

    rotary = RotaryEmbedding(64, 64, {"rope_theta": 10000.0, "rope_type": "default"})
    rotary.build()
    qkv, kc, vc, tables, ctx, pos, slots = _qkv_case([20, 30], 9, 3, 64, 16)
    before = [x.clone() for x in (qkv, kc, vc)]
    out = torch.empty(2, 9 * 64)

    def call(pos=pos, slots=slots, tables=tables, ctx=ctx, qkv=qkv, max_len=30):
        kernel.rotary_store_attend(pos, qkv, 9, rotary.cos, rotary.sin, kc, vc, slots, tables,
                                   ctx, max_len, 0.125, out)  # fmt: skip

    with pytest.raises(ValueError, match="outside the rotary tables"):
        call(pos=torch.tensor([19, 64]))
    with pytest.raises(IndexError, match="outside the cache"):
        call(slots=torch.tensor([0, kc.shape[0] * kc.shape[1]]))
    bad = tables.clone()
    bad[1, 0] = -1
    with pytest.raises(RuntimeError, match="paged decode kernel failed"):
        call(tables=bad)
    with pytest.raises(RuntimeError, match="paged decode kernel failed"):
        call(ctx=torch.tensor([20, 33]), max_len=33)
    with pytest.raises(ValueError, match="qkv rows"):
        call(qkv=qkv[:, :-64])
    for x, y in zip((qkv, kc, vc), before, strict=True):
        assert torch.equal(x, y)
