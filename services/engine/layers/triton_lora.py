"""Triton kernels of batched LoRA on CUDA: shrink (``x A^T``) and expand (``y += (x A^T) B^T``)
over the rows of a mixed batch grouped by adapter slot, as vLLM's punica kernels (sgmv).

The batch's adapter rows are listed slot by slot (``Segments``: ``order`` holds row indices,
slot ``s`` owns ``order[starts[s] : starts[s] + counts[s]]``). One program computes a tile of
rows of one slot against that slot's factors, read in place from the layer's fixed
``a`` [slots, width, in] and ``b`` [slots, out, width] tensors: no gathered copy of factors or
rows, no padding rows, and the same three launches per layer whatever the number of adapters
(``layers/lora.py`` pads or groups on the CPU instead). Each row belongs to one slot, so expand
adds into ``y`` without atomics. A fused layer's ``b`` is block diagonal (each shard its own
rank columns): expand reads, for an output tile, only the rank columns of the shard that tile
lies in, skipping the zero blocks (a third of the work of a q/k/v layer's expand).

The kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors
(``tests/engine/test_triton_interpret.py`` checks them against the torch path there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # rows of one slot per program (tl.dot needs at least 16)
BLOCK_N = 32
BLOCK_K = 32


@dataclass(frozen=True)
class Segments:
    """The adapter rows of one forward pass, slot by slot (built by ``segments``)."""

    order: torch.Tensor  # [n] int64 row indices of the batch, slot 0's first
    starts: torch.Tensor  # [slots] int32: where each slot's rows start in ``order``
    counts: torch.Tensor  # [slots] int32: how many rows each slot has (0: unused)
    max_count: int  # the most rows of one slot (the grid's row dimension)


def segments(rows_of_slot: list[list[int]], device: torch.device) -> Segments:
    """``rows_of_slot[s]``: the batch rows that use slot ``s``."""
    counts = [len(r) for r in rows_of_slot]
    starts = [sum(counts[:s]) for s in range(len(counts))]
    order = [i for r in rows_of_slot for i in r]
    return Segments(
        torch.tensor(order, dtype=torch.long, device=device),
        torch.tensor(starts, dtype=torch.int32, device=device),
        torch.tensor(counts, dtype=torch.int32, device=device),
        max(counts, default=0),
    )


@triton.jit
def _tile(
    left_ptr, left_rows, stride_left, right_ptr, stride_right, n, mask_m, mask_n, k_lo, k_hi,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """``left[left_rows, k_lo:k_hi] @ right[n, k_lo:k_hi].T`` in float32: [BM, BN]."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        k = k0 + tl.arange(0, BK)
        mask_k = k < k_hi
        lt = tl.load(left_ptr + left_rows[:, None] * stride_left + k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        rt = tl.load(right_ptr + n[None, :] * stride_right + k[:, None],
                     mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # fmt: skip
        acc += tl.dot(lt, rt)
    return acc


@triton.jit
def _slot_rows(starts_ptr, counts_ptr, BM: tl.constexpr):
    """This program's slot, where its rows start in ``order``, how many it has, and the
    offsets of this program's tile of them (grid: row tile, column tile, slot)."""
    s = tl.program_id(2)
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    return s, tl.load(starts_ptr + s), tl.load(counts_ptr + s), m


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr, order_ptr, starts_ptr, counts_ptr,
    K, W, stride_x, stride_as, stride_aw, stride_out,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    s, start, count, m = _slot_rows(starts_ptr, counts_ptr, BM)
    if tl.program_id(0) * BM < count:  # else: this slot has fewer rows
        mask_m = m < count
        rows = tl.load(order_ptr + start + m, mask=mask_m, other=0)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        mask_n = n < W
        acc = _tile(x_ptr, rows, stride_x, a_ptr + s * stride_as, stride_aw, n, mask_m, mask_n,
                    0, K, BM, BN, BK)  # fmt: skip
        out = out_ptr + (start + m)[:, None] * stride_out + n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _expand_kernel(
    xa_ptr, b_ptr, y_ptr, order_ptr, starts_ptr, counts_ptr,
    shard_lo_ptr, shard_hi_ptr, N, W, RANK, stride_xa, stride_bs, stride_bn, stride_y,
    SHARDS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    s, start, count, m = _slot_rows(starts_ptr, counts_ptr, BM)
    if tl.program_id(0) * BM < count:  # else: this slot has fewer rows
        mask_m = m < count
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        # The rank columns this output tile reads: those of the shard it lies in (shard i
        # owns output rows [lo_i, hi_i) and rank columns [i * RANK, (i + 1) * RANK)), else all.
        first = tl.program_id(1) * BN
        last = tl.minimum(first + BN, N) - 1
        k_lo = first * 0
        k_hi = k_lo + W
        for i in tl.static_range(SHARDS):
            lo, hi = tl.load(shard_lo_ptr + i), tl.load(shard_hi_ptr + i)
            inside = (first >= lo) & (last < hi)
            k_lo = tl.where(inside, i * RANK, k_lo)
            k_hi = tl.where(inside, i * RANK + RANK, k_hi)
        acc = _tile(xa_ptr, start + m, stride_xa, b_ptr + s * stride_bs, stride_bn, n, mask_m,
                    n < N, k_lo, k_hi, BM, BN, BK)  # fmt: skip
        mask = mask_m[:, None] & (n < N)[None, :]
        rows = tl.load(order_ptr + start + m, mask=mask_m, other=0)
        y = y_ptr + rows[:, None] * stride_y + n[None, :]
        tl.store(y, (tl.load(y, mask=mask, other=0.0) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, seg: Segments) -> torch.Tensor:
    """``x[row] @ a[slot].T`` for every adapter row, in ``seg.order``: [n, width]."""
    slots, width, k = a.shape
    out = torch.empty(seg.order.shape[0], width, dtype=x.dtype, device=x.device)
    if seg.max_count == 0:
        return out
    assert x.stride(1) == 1 and a.stride(2) == 1
    grid = (triton.cdiv(seg.max_count, BLOCK_M), triton.cdiv(width, BLOCK_N), slots)
    _shrink_kernel[grid](
        x, a, out, seg.order, seg.starts, seg.counts, k, width, x.stride(0), a.stride(0),
        a.stride(1), out.stride(0), BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
    )  # fmt: skip
    return out


def lora_expand_(
    y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, seg: Segments, shards: torch.Tensor,
    rank: int,
) -> torch.Tensor:  # fmt: skip
    """``y[row] += xa[i] @ b[slot].T`` for the i-th adapter row of ``seg.order``, in place.
    ``shards``: [2, shards] int32 output rows [lo, hi) of each shard, whose rank columns are
    ``rank`` apart."""
    slots, n, width = b.shape
    if seg.max_count == 0:
        return y
    assert y.stride(1) == 1 and b.stride(2) == 1 and xa.stride(1) == 1
    grid = (triton.cdiv(seg.max_count, BLOCK_M), triton.cdiv(n, BLOCK_N), slots)
    _expand_kernel[grid](
        xa, b, y, seg.order, seg.starts, seg.counts, shards[0], shards[1], n, width, rank,
        xa.stride(0), b.stride(0), b.stride(1), y.stride(0), SHARDS=shards.shape[1],
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
    )  # fmt: skip
    return y
