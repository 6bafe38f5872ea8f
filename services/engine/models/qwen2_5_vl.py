"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's language side (M-RoPE) with
a vision tower that uses RMSNorm, a gated SiLU MLP and windowed attention (full attention
only in ``fullatt_block_indexes``). Images only: video time scaling is not implemented.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import heartbeat
from services.engine.layers.norm import RMSNorm
from services.engine.models.qwen2_vl import Qwen2VLForConditionalGeneration
from services.engine.models.qwen2_vl_vision import (
    PatchEmbed,
    Qwen2VisionTransformer,
    VisionAttention,
)


class GatedMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = GatedMlp(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, context_dim: int, merge: int) -> None:
        super().__init__()
        self.hidden = context_dim * merge**2
        self.ln_q = RMSNorm(context_dim, 1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


def window_index(
    grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, list[int]]:
    """Order of the merged patch groups that makes each attention window contiguous, and the
    windows' cumulative patch counts (as transformers' ``get_vision_window_index``)."""
    index: list[torch.Tensor] = []
    cu = [0]
    base = 0
    win = window_size // merge // patch_size
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = win - gh % win, win - gw % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = F.pad(idx, (0, pad_w, 0, pad_h), "constant", -100)
        padded = (
            padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        )
        counts = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + base)
        for c in counts.tolist():
            if c:
                cu.append(cu[-1] + c * merge**2)
        base += t * gh * gw
    return torch.cat(index), cu


class Qwen2_5_VisionTransformer(Qwen2VisionTransformer):
    def __init__(self, cfg: Any) -> None:
        nn.Module.__init__(self)
        self.spatial_merge_size = cfg.spatial_merge_size
        self.patch_size = cfg.patch_size
        self.window_size = cfg.window_size
        self.fullatt_block_indexes = set(cfg.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(
            SimpleNamespace(
                in_channels=cfg.in_channels,
                patch_size=cfg.patch_size,
                temporal_patch_size=cfg.temporal_patch_size,
                embed_dim=cfg.hidden_size,
            )
        )
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.hidden_size, cfg.spatial_merge_size)
        self.head_dim = cfg.hidden_size // cfg.num_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        self.rope_theta = float(rope.get("rope_theta", 10000.0))

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).cpu()
        frame = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
        cu_full = [0, *frame.cumsum(0).tolist()]
        order, cu_window = window_index(
            grid_thw, self.spatial_merge_size, self.window_size, self.patch_size
        )
        unit = self.spatial_merge_size**2

        def permute(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            return x.reshape(n // unit, unit, *x.shape[1:])[order].reshape(x.shape)

        cos, sin = self._rotary(grid_thw)
        cos, sin = permute(cos), permute(sin)
        x = permute(self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.device)))
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_full if i in self.fullatt_block_indexes else cu_window, cos, sin)
            heartbeat.beat()  # a big image's tower is slow, not stuck (heartbeat.py)
        return self.merger(x)[torch.argsort(order)]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_class = Qwen2_5_VisionTransformer
