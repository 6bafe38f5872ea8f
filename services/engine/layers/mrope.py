"""Multimodal rotary embedding (M-RoPE) of Qwen2-VL / Qwen2.5-VL: 3-D positions.

Text tokens get the same index on the temporal, height and width axes (plain RoPE); the
image-pad tokens of one image get (t, h, w) grid coordinates offset by the position where the
image starts, and the text after an image continues from ``start + max(h, w) / merge``. Each
head dimension pair is rotated by one axis, chosen by ``mrope_section`` (e.g. [16, 24, 24]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from services.engine.layers.rotary import inv_frequencies, rope_parameters


def mrope_positions(
    token_ids: Sequence[int],
    image_token_id: int,
    image_grid_thw: Sequence[Sequence[int]],
    spatial_merge_size: int,
) -> tuple[torch.Tensor, int]:
    """3-D positions ``[3, len(token_ids)]`` of a prompt and its ``delta``, as transformers'
    ``Qwen2VLModel.get_rope_index``; a decode token at sequence index ``i`` has position
    ``i + delta`` on all three axes.

    NOTE: a run of image-pad tokens is split by each image's token count
    (``t * h * w / merge**2``), so two images with no text between them stay two images.
    """
    n = len(token_ids)
    pos = torch.empty(3, n, dtype=torch.long)
    grids = [tuple(int(x) for x in g) for g in image_grid_thw]
    image_idx = 0
    cur = 0  # next text position
    i = 0
    while i < n:
        if token_ids[i] != image_token_id:
            pos[:, i] = cur
            cur += 1
            i += 1
            continue
        if image_idx >= len(grids):
            raise ValueError("more image-pad tokens than images in image_grid_thw")
        t, h, w = grids[image_idx]
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        count = t * gh * gw
        if i + count > n or any(tok != image_token_id for tok in token_ids[i : i + count]):
            raise ValueError(
                f"image {image_idx} needs {count} consecutive image-pad tokens at index {i}"
            )
        tt, hh, ww = torch.meshgrid(
            torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"
        )
        pos[:, i : i + count] = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
        cur += max(gh, gw)
        i += count
        image_idx += 1
    if image_idx != len(grids):
        raise ValueError(f"{len(grids)} images but image-pad tokens for {image_idx}")
    delta = int(pos.max()) + 1 - n if n else 0
    return pos, delta


def decode_positions(seq_len: int, delta: int) -> torch.Tensor:
    """The ``[3, 1]`` position of the token at index ``seq_len - 1`` once past the prompt."""
    return torch.full((3, 1), seq_len - 1 + delta, dtype=torch.long)


class MRotaryEmbedding(nn.Module):
    """Rotary embedding over ``[3, T]`` positions; ``[T]`` positions (text only) also work.

    ``forward`` has the signature of ``RotaryEmbedding.forward`` so the decoder layers need no
    change: the model passes 3-D positions where the plain model passes 1-D ones.
    """

    def __init__(self, head_dim: int, max_positions: int, hf_text_config: Any) -> None:
        super().__init__()
        params = rope_parameters(hf_text_config)
        section = params.get("mrope_section") or [16, 24, 24]
        params = {k: v for k, v in params.items() if k not in ("mrope_section", "type")}
        if params.get("rope_type") == "mrope":
            params["rope_type"] = "default"
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {section} must sum to head_dim/2={head_dim // 2}")
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.params = params
        self.section = [int(s) for s in section]
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        if torch.get_default_device().type != "meta":  # as RotaryEmbedding (rotary.py)
            self.build()

    def build(self, device: torch.device | None = None) -> None:
        inv_freq = inv_frequencies(self.head_dim, self.params)
        t = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.cos = freqs.cos().to(device)
        self.sin = freqs.sin().to(device)

    def _table(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions.dim() == 1:
            half = table[positions]
        else:
            # Axis a supplies the frequencies of its mrope_section slice.
            parts = table[positions].split(self.section, dim=-1)  # each [3, T, s]
            half = torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1)
        return torch.cat((half, half), dim=-1).unsqueeze(1)  # [T, 1, D]

    def forget(self) -> None:
        """End of a forward pass (``RotaryEmbedding.forget``): nothing is kept here."""

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self._table(self.cos, positions)
        sin = self._table(self.sin, positions)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
