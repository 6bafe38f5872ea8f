"""Mixture-of-experts: top-k routing as transformers does it, and the reference expert
computation on any device (tokens grouped by expert, one pair of matmuls per expert hit).

Expert weights are raw 3-D tensors, not ``nn.Linear`` modules, so the CPU oneDNN packing
(``cpu_linear.py``) leaves them alone: ``w13`` [experts, 2 * intermediate, hidden] holds each
expert's gate rows then its up rows (the checkpoint's ``gate_proj``/``w1`` and
``up_proj``/``w3``), ``w2`` [experts, hidden, intermediate] its ``down_proj``/``w2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [tokens, top_k] in the logits' dtype, expert ids [tokens, top_k]).

    Softmax in float32 over all experts, then the top k, then (``renormalize``) divided by
    their sum: the order Qwen2-MoE, Qwen3-MoE (``norm_topk_prob``) and Mixtral (always) use.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def experts_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{slots[t, k]}(x[t]) for the slots held here.

    ``slots`` index ``w13``/``w2``; a slot of -1 is an expert held by another rank and
    contributes nothing (its rank adds it in the combine). The (token, k) pairs are sorted by
    slot so that each expert runs once on all of its tokens.
    """
    out = torch.zeros_like(x)
    k = slots.shape[1]
    flat = slots.reshape(-1)
    held = (flat >= 0).nonzero().squeeze(1)
    if held.numel() == 0:
        return out
    order = held[flat[held].argsort(stable=True)]
    counts = torch.bincount(flat[order], minlength=w13.shape[0]).tolist()
    flat_weights = weights.reshape(-1)
    inter = w2.shape[2]
    start = 0
    for slot, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        tokens = pairs // k
        gate_up = F.linear(x[tokens], w13[slot])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        h = F.linear(h, w2[slot]) * flat_weights[pairs, None]
        out.index_add_(0, tokens, h)
    return out


class Experts(nn.Module):
    """The routed experts of one layer, stored fused (see the module docstring).

    ``slot_of`` maps a global expert id to its slot here (-1: not held here); None (every
    expert held: one device, or tensor-parallel slices of every expert) is the identity.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.slot_of: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        slots = ids if self.slot_of is None else self.slot_of[ids]
        return experts_reference(x, self.w13, self.w2, weights, slots)

    def expert_tensor(self, expert: int, part: str) -> torch.Tensor:
        """The view of ``w13``/``w2`` a checkpoint tensor of ``expert`` is copied into
        (``part``: gate, up or down)."""
        if part == "down":
            return self.w2.data[expert]
        offset = 0 if part == "gate" else self.intermediate
        return self.w13.data[expert].narrow(0, offset, self.intermediate)
