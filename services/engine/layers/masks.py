"""Additive attention masks: SDPA adds a float mask to the scores, which costs less than a
boolean one (converted to float in every call)."""

from __future__ import annotations

import torch


def additive_mask(limits: torch.Tensor, span: int, dtype: torch.dtype) -> torch.Tensor:
    """``[*limits.shape, span]``: 0 for the key positions below each query row's limit (the
    number of context tokens it attends to), -inf from the limit on."""
    past = torch.arange(span, device=limits.device) >= limits[..., None]
    mask = torch.zeros(past.shape, dtype=dtype, device=limits.device)
    return mask.masked_fill_(past, float("-inf"))
