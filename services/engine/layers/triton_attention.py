"""The CUDA attention backend: Triton kernels that read the paged KV cache in place.

Decode attention walks each sequence's block table inside the kernel (no gathered copy of the
context, no padding mask), one program per (sequence, KV head) computing all the query heads
of that group with an online softmax. The KV write skips negative slots, so the padded rows
of a CUDA-graph batch write nothing. Both kernels take every length from device tensors: a
decode step launches the same kernels whatever the context lengths, which is what lets a
captured CUDA graph be replayed step after step.

Speculative verifications (short chunks of 1 + k query tokens over a cached context, grouped
by ``short_chunks.plan``) run in the same decode kernel: each query row is a decode row of its
own, with its sequence's block table and its causal limit as the context length, so the
kernel reads the paged cache in place as for decodes (the KV of the chunk itself is stored
before attention). Longer prefill chunks use ``scaled_dot_product_attention`` (flash /
memory-efficient kernels on CUDA), as in the reference backend.

The kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors (the CPU tests do that when
triton is installed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.engine.layers import short_chunks
from services.engine.layers.attention import AttentionMetadata, TorchAttention

# Context tokens one loop iteration of the decode kernel reads (several KV blocks when the
# block size is small; tl.dot needs at least 16).
DECODE_TILE = 64


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_k,
    stride_v,
    ROW: tl.constexpr,
    ROW_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        i = tl.arange(0, ROW_PAD)
        mask = i < ROW
        k = tl.load(k_ptr + t * stride_k + i, mask=mask)
        v = tl.load(v_ptr + t * stride_v + i, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + i, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + i, v, mask=mask)


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D], rows may be strided (views of the fused qkv output)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], contiguous
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [T]; a negative slot writes nothing
) -> None:
    t, hkv, d = k.shape
    if t == 0:
        return
    for x in (k, v):
        if x.stride(2) != 1 or x.stride(1) != d:
            raise ValueError("store_kv needs each token's [Hkv, D] row contiguous")
    row = hkv * d
    _store_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0), row, triton.next_power_of_2(row)
    )


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,  # cache strides: block, slot, kv head (the head dim is contiguous)
    stride_cs,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    IEEE: tl.constexpr,  # float32 caches: exact products (no TF32)
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + g
    qmask = gmask[:, None] & dmask[None, :]
    q = tl.load(
        q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    s_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for start in range(0, ctx, TILE):
        t = start + tl.arange(0, TILE)
        tmask = t < ctx
        block = tl.load(table + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        off = block * stride_cb + (t % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        kvmask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(tmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    # A padded row of a graph batch has no context: its output is 0, not NaN.
    out = acc / tl.where(s_sum > 0, s_sum, 1.0)[:, None]
    tl.store(
        out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=qmask,
    )


def paged_decode(
    out: torch.Tensor,  # [B, H, D]
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32; 0 means an empty (padded) row
    scale: float,
) -> None:
    b, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if q.stride(2) != 1 or out.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("paged_decode needs the head dimension contiguous")
    group = h // hkv
    _paged_decode_kernel[(b, hkv)](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_SIZE=block_size,
        TILE=max(DECODE_TILE, block_size),
        IEEE=k_cache.dtype == torch.float32,
    )


def paged_chunks(group: short_chunks.ChunkGroup, q, k_cache, v_cache, scale: float, out) -> None:
    """A group of short chunks through ``paged_decode``, one decode row per query row."""
    if group.paged is None:
        tables = group.tables.repeat_interleave(group.n, dim=0).to(torch.int32)
        group.paged = (tables, group.limits.reshape(-1).to(torch.int32))
    tables, lens = group.paged
    rows = q[group.rows]
    o = torch.empty_like(rows)
    paged_decode(o, rows, k_cache, v_cache, tables, lens, scale)
    out[group.rows] = o


class TritonAttention(TorchAttention):
    """Paged decode and verification chunks in a Triton kernel; longer prefill chunks as in
    the reference backend."""

    paged_decode = True

    @staticmethod
    def store(k, v, k_cache, v_cache, slots: torch.Tensor) -> None:
        store_kv(k, v, k_cache, v_cache, slots)

    @staticmethod
    def decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        paged_decode(
            out[: q.shape[0]],
            q,
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
        )

    @staticmethod
    def prefill(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
        if not meta.prefills or not meta.write_kv:
            TorchAttention.prefill(q, k, v, k_cache, v_cache, meta, scale, out)
            return
        if meta.chunk_plan is None:
            meta.chunk_plan = short_chunks.plan(meta.prefills, k_cache.shape[1], q.device)
        groups, rest = meta.chunk_plan
        for group in groups:
            paged_chunks(group, q, k_cache, v_cache, scale, out)
        if rest:  # the reference backend's path for them alone (the plan is every layer's)
            meta.chunk_plan = ([], rest)
            try:
                TorchAttention.prefill(q, k, v, k_cache, v_cache, meta, scale, out)
            finally:
                meta.chunk_plan = (groups, rest)
