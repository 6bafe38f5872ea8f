"""RMSNorm computed in float32, as transformers does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.layers import fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.on_cuda_rows(x):
            return fused.ops.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One kernel instead of six; in float32 it computes the same values as the lines
            # below (transformers' formula), bit for bit on this project's CPUs.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def add_forward(
        self, x: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, norm(x + delta))``: a residual add and the next norm, one kernel on
        CUDA."""
        if fused.on_cuda_rows(x) and fused.on_cuda_rows(delta):
            return fused.ops.add_rms_norm(x, delta, self.weight, self.eps)
        total = x + delta
        return total, self(total)
