"""RMSNorm computed in float32, as transformers does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.layers import cpu_fused, fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.on_cuda_rows(x):
            return fused.ops.rms_norm(x, self.weight, self.eps)
        cpu = cpu_fused.ops()
        if cpu is not None and cpu.norm_usable(x, self.weight):
            return cpu.rms_norm(x, self.weight, self.eps)[1]  # one pass, one C call
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
        CUDA and (float32) on the CPU."""
        if fused.on_cuda_rows(x) and fused.on_cuda_rows(delta):
            return fused.ops.add_rms_norm(x, delta, self.weight, self.eps)
        cpu = cpu_fused.ops()
        if cpu is not None and cpu.norm_usable(x, self.weight) and _same_rows(x, delta):
            return cpu.rms_norm(x, self.weight, self.eps, delta)
        total = x + delta
        return total, self(total)


def _same_rows(x: torch.Tensor, delta: torch.Tensor) -> bool:
    return delta.shape == x.shape and delta.dtype == x.dtype and delta.device == x.device
