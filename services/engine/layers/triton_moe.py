"""Fused mixture-of-experts on CUDA: a layer's routed experts as two grouped GEMMs over the
(token, k) pairs sorted by expert, the design of vLLM's ``fused_moe``.

The reference (``moe.experts_reference``) loops over the experts in Python: two matmuls, a
gather and a scatter-add per expert hit, each its own launch and most of them tiny at decode
sizes (a 128-expert layer at batch 64 hits ~100 experts with a few tokens each). Here:

1. ``align_by_expert`` sorts the pairs by the slot (expert) that computes them and pads each
   slot's run to a multiple of ``BLOCK_M`` rows, so that every block of rows belongs to one
   expert (torch ops on the device, no host sync, so a CUDA graph can hold it: the grid covers
   the worst case and blocks past the used rows return at once).
2. ``_grouped_gemm`` computes, for each block, its rows of ``x @ w13[expert].T`` (rows read
   from token ``pair // top_k``), in float32, stored per pair: [pairs, 2 * intermediate].
3. ``silu(gate) * up`` (``triton_ops.silu_and_mul``).
4. ``_grouped_gemm`` again with ``w2``, each row scaled by its routing weight: [pairs, hidden].
5. The k rows of each token are summed.

Pairs of slot -1 (experts held by another rank under expert parallelism) are left out and
contribute zeros, as in the reference. Float32 inputs use exact (IEEE) dot products, not TF32,
so the engine's float32 GPU runs keep matching transformers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.engine.layers import triton_ops

BLOCK_M = 16  # rows (pairs) per block; each expert's run is padded to a multiple of it


def usable(x: torch.Tensor) -> bool:
    """Whether the experts of ``x`` [tokens, hidden] take the fused path: CUDA tensors."""
    return x.is_cuda


@triton.jit
def _grouped_gemm(
    a_ptr, b_ptr, c_ptr, w_ptr, sorted_ptr, expert_ptr, used_ptr,
    N, K, num_pairs, rows_per_token,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[pair, n] = sum_k A[pair // rows_per_token, k] * B[expert, n, k] (* w[pair]) for the
    BLOCK_M sorted pairs of program 0's block and BLOCK_N columns of program 1's."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(used_ptr):
        return
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    mask_m = pair < num_pairs  # padding rows hold num_pairs
    a_row = (pair // rows_per_token).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(w_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)
        # NOTE: rounded to the output dtype first, as the reference's F.linear output is.
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32) * w[:, None]
    c_ptrs = c_ptr + pair[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def align_by_expert(
    slots: torch.Tensor, num_slots: int, block_m: int = BLOCK_M
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pair ids, slot of each block, rows used) for ``slots`` [tokens, k] (-1: not
    here). The pair ids (``token * k + j``) of one slot are contiguous and padded with
    ``tokens * k`` to a multiple of ``block_m``; the blocks past the rows used have slot -1."""
    flat = slots.reshape(-1).long()
    pairs = flat.numel()
    key = torch.where(flat >= 0, flat, num_slots)  # pairs computed elsewhere sort last
    # NOTE: not torch.bincount, whose CUDA version reads the largest id on the host (a sync,
    # and an error inside a CUDA graph capture).
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=flat.device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_slots]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded  # each slot's first padded row
    order = key.argsort(stable=True)
    sorted_key = key[order]
    # Position of each sorted pair inside its slot's run, then its padded row.
    slot = sorted_key.clamp_max(num_slots - 1)
    within = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[slot]
    capacity = -(-(pairs + num_slots * (block_m - 1)) // block_m) * block_m
    dest = torch.where(sorted_key < num_slots, starts[slot] + within, capacity)
    sorted_ids = torch.full((capacity + 1,), pairs, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))  # pairs of no slot: the spare row
    block_rows = torch.arange(0, capacity, block_m, device=flat.device)
    block_slot = torch.searchsorted(ends, block_rows, right=True)
    block_slot = torch.where(block_slot < num_slots, block_slot, -1).to(torch.int32)
    return sorted_ids[:capacity], block_slot, ends[-1:].to(torch.int32)


def _gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rows_per_token: int,
    weights: torch.Tensor | None,
) -> None:
    sorted_ids, block_slot, used = aligned
    n, k = b.shape[1], b.shape[2]
    block_n = 64 if n >= 64 else 32
    block_k = 64 if k >= 64 else 32
    grid = (block_slot.numel(), triton.cdiv(n, block_n))
    _grouped_gemm[grid](
        a, b, out, weights if weights is not None else out, sorted_ids, block_slot, used,
        n, k, out.shape[0], rows_per_token,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1),
        MUL_WEIGHT=weights is not None, IEEE=a.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """What ``moe.experts_reference`` computes (same arguments), in four launches."""
    tokens, top_k = slots.shape
    if tokens == 0:
        return torch.zeros_like(x)
    pairs = tokens * top_k
    aligned = align_by_expert(slots, w13.shape[0])
    gate_up = torch.empty(pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    _gemm(x, w13, gate_up, aligned, top_k, None)
    h = triton_ops.silu_and_mul(gate_up)
    # Pairs no slot here computes stay zero (their rank adds them in the combine).
    down = torch.zeros(pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _gemm(h, w2, down, aligned, 1, weights.reshape(-1).contiguous())
    return down.view(tokens, top_k, -1).sum(dim=1)
