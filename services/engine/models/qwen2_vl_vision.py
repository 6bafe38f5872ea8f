"""Qwen2-VL vision tower (ViT with 2-D rotary embeddings) and patch merger, HF parameter names.

Input is the image processor's ``pixel_values`` ``[num_patches, C * T * P * P]`` plus
``image_grid_thw`` ``[num_images, 3]``; output is one embedding per merged 2x2 patch group,
``[sum(t * h * w / merge**2), text_hidden_size]``, in the order of the image-pad tokens.
Attention is full (non-causal) within each frame of each image, never across images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import heartbeat


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "silu": F.silu,
}


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.in_channels = cfg.in_channels
        self.patch_size = cfg.patch_size
        self.temporal_patch_size = cfg.temporal_patch_size
        self.embed_dim = cfg.embed_dim
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel, stride=kernel, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, self.in_channels, self.temporal_patch_size, self.patch_size, self.patch_size)
        return self.proj(x.to(self.proj.weight.dtype)).view(-1, self.embed_dim)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = torch.empty_like(q)
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)
        return self.proj(out.reshape(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"unsupported vision hidden_act {act!r} (supported: {sorted(_ACTS)})")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg.embed_dim, cfg.num_heads)
        self.mlp = VisionMlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.hidden_act)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then concatenate each ``merge x merge`` group of patches and project."""

    def __init__(self, dim: int, context_dim: int, merge: int) -> None:
        super().__init__()
        self.hidden = context_dim * merge**2
        self.ln_q = nn.LayerNorm(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class Qwen2VisionTransformer(nn.Module):
    """``model.visual`` of ``Qwen2VLForConditionalGeneration`` (checkpoint prefix ``visual.``,
    or ``model.visual.`` in transformers v5 layout)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.spatial_merge_size = cfg.spatial_merge_size
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger: nn.Module = PatchMerger(cfg.hidden_size, cfg.embed_dim, cfg.spatial_merge_size)
        self.head_dim = cfg.embed_dim // cfg.num_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        self.rope_theta = float(rope.get("rope_theta", 10000.0))

    def _rotary(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[N, 1, head_dim]`` from (h, w) patch coordinates, laid out merge-block
        major so that each merged group's patches are adjacent."""
        m = self.spatial_merge_size
        pos = []
        for t, h, w in grid_thw.tolist():
            hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            shape = (h // m, m, w // m, m)
            hh = hh.reshape(shape).transpose(1, 2).flatten()
            ww = ww.reshape(shape).transpose(1, 2).flatten()
            pos.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
        # NOTE: computed here, not kept as a buffer, so a tower built on the meta device and
        # moved with ``to_empty`` needs no rebuild.
        spatial = self.head_dim // 2
        inv_freq = 1.0 / (
            self.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial)
        )
        freqs = torch.cat(pos)[..., None].float() * inv_freq  # [N, 2, D/4]
        hw = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([hw, hw], dim=-1).unsqueeze(1)
        device = self.patch_embed.proj.weight.device
        return emb.cos().to(device), emb.sin().to(device)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).cpu()
        frame = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
        cu_seqlens = [0, *frame.cumsum(0).tolist()]
        cos, sin = self._rotary(grid_thw)
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.device))
        for blk in self.blocks:
            x = blk(x, cu_seqlens, cos, sin)
            heartbeat.beat()  # a big image's tower is slow, not stuck (heartbeat.py)
        return self.merger(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors named relative to the tower (``blocks.0.attn.qkv.weight``, ...)."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"vision tensor {name!r} has no matching parameter")
            if params[name].shape != tensor.shape:
                raise ValueError(f"shape mismatch for vision tensor {name}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing vision tensors: {sorted(missing)[:4]}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)
