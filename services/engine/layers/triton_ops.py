"""Fused Triton kernels for the small per-layer ops on CUDA.

A decode step of a small batch is a few hundred kernels, most of them tiny: RMSNorm alone is
seven torch ops, the rotary embedding about ten per tensor. Each costs a few microseconds
even inside a CUDA graph, which on an 8B model adds up to a third of the step. These kernels
do each op in one launch with the same arithmetic as the torch code they replace (float32
inside, rounding to the input dtype where transformers rounds), so outputs match the
reference path to float32 rounding.

The layers call them for CUDA tensors when triton is installed (``norm.py``, ``rotary.py``,
``models/llama.py``); everything else takes the plain torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def usable(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the Triton path: a CUDA tensor whose rows are contiguous."""
    return x.is_cuda and x.dim() == 2 and x.stride(1) == 1


@triton.jit
def _rms_norm_kernel(
    x_ptr, delta_ptr, sum_ptr, out_ptr, w_ptr, stride_x, stride_d, stride_s, stride_o, n, eps,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + row * stride_x + i, mask=mask, other=0.0)
    if HAS_DELTA:
        # The residual sum is rounded to the stream's dtype before it is normalized.
        delta = tl.load(delta_ptr + row * stride_d + i, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + i, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + i, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    rows, n = x.shape
    if rows:
        _rms_norm_kernel[(rows,)](
            x, x, x, out, weight, x.stride(0), 0, 0, out.stride(0), n, eps,
            HAS_DELTA=False, BLOCK=triton.next_power_of_2(n),
        )  # fmt: skip
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, rms_norm(x + delta))`` in one pass."""
    total = torch.empty_like(x)
    out = torch.empty_like(x)
    rows, n = x.shape
    if rows:
        _rms_norm_kernel[(rows,)](
            x, delta, total, out, weight, x.stride(0), delta.stride(0), total.stride(0),
            out.stride(0), n, eps, HAS_DELTA=True, BLOCK=triton.next_power_of_2(n),
        )  # fmt: skip
    return total, out


@triton.jit
def _rotate_heads(base, mask, c, s, HALF: tl.constexpr):
    """Rotate [heads, HALF] pairs (x1 at ``base``, x2 HALF further) in place."""
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base, (a * c - b * s).to(x1.dtype), mask=mask)
    tl.store(base + HALF, (b * c + a * s).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
    stride_cos, HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    j = tl.arange(0, HALF_PAD)
    jmask = j < HALF
    c = tl.load(cos_ptr + pos * stride_cos + j, mask=jmask, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + j, mask=jmask, other=0.0)[None, :]
    hq = tl.arange(0, HQ_PAD)
    _rotate_heads(
        q_ptr + t * stride_qt + hq[:, None] * stride_qh + j[None, :],
        (hq[:, None] < HQ) & jmask[None, :], c, s, HALF,
    )  # fmt: skip
    hk = tl.arange(0, HK_PAD)
    _rotate_heads(
        k_ptr + t * stride_kt + hk[:, None] * stride_kh + j[None, :],
        (hk[:, None] < HK) & jmask[None, :], c, s, HALF,
    )  # fmt: skip


def rotary_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place ("rotate half" layout); ``cos``/``sin``
    are the float32 [positions, D] tables of ``RotaryEmbedding``."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if t:
        half = d // 2
        _rotary_kernel[(t,)](
            q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos.stride(0), HQ=hq, HK=hk, HQ_PAD=triton.next_power_of_2(hq),
            HK_PAD=triton.next_power_of_2(hk), HALF=half, HALF_PAD=triton.next_power_of_2(half),
        )  # fmt: skip
    return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    gate = tl.load(x_ptr + row * stride_x + i, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + i, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + i, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :n]) * x[:, n:]`` for x [T, 2n]."""
    rows, width = x.shape
    n = width // 2
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        block = 1024
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
            x, out, x.stride(0), out.stride(0), n, BLOCK=block
        )
    return out
