"""Mixture-of-experts: top-k routing as transformers does it, and the reference expert
computation on any device (tokens grouped by expert, one pair of matmuls per expert hit); on
CUDA the fused Triton kernels of ``triton_moe.py`` compute the same.

Expert weights are raw 3-D tensors, not ``nn.Linear`` modules, so the CPU oneDNN packing
(``cpu_linear.py``) leaves them alone: ``w13`` [experts, 2 * intermediate, hidden] holds each
expert's gate rows then its up rows (the checkpoint's ``gate_proj``/``w1`` and
``up_proj``/``w3``), ``w2`` [experts, hidden, intermediate] its ``down_proj``/``w2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.eplb import ExpertPlacement
from services.engine.layers import fused


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

    Every expert is held here (one device; or tensor parallelism, where ``inter_start`` is
    where this rank's slice of each expert's intermediate starts), or, under expert
    parallelism, the experts an ``ExpertPlacement`` gives this rank (``place``).
    """

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, num_slots: int | None = None
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate = intermediate
        slots = num_slots or num_experts
        self.w13 = nn.Parameter(torch.empty(slots, 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(slots, hidden, intermediate))
        self.inter_start = 0
        # Expert parallelism (``place``): each expert's slots here, and the routing tables.
        self.slots: dict[int, list[int]] | None = None
        self.replica_ids: list[list[int]] = []  # per expert, its physical ids (all ranks)
        self.first_physical = 0  # physical id of this rank's slot 0
        self.placement: ExpertPlacement | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def place(self, placement: ExpertPlacement, rank: int) -> None:
        """Hold ``placement.ranks[rank]`` (weights loaded afterwards, per ``slots``)."""
        mine = placement.ranks[rank]
        self.slots = {}
        for slot, expert in enumerate(mine):
            self.slots.setdefault(expert, []).append(slot)
        self.replica_ids = placement.replicas()
        self.first_physical = rank * placement.slots_per_rank
        self.placement = placement
        self._tables = None

    def _routing_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(physical ids [experts, most replicas] padded with -1, replica counts)."""
        if self._tables is None or self._tables[0].device != device:
            width = max(len(p) for p in self.replica_ids)
            table = [p + [-1] * (width - len(p)) for p in self.replica_ids]
            self._tables = (
                torch.tensor(table, dtype=torch.long, device=device),
                torch.tensor([len(p) for p in self.replica_ids], dtype=torch.long, device=device),
            )
        return self._tables

    def local_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """The slot here of each (token, k) expert, or -1 when another rank computes it. A
        replicated expert's tokens alternate over its replicas by token index."""
        if self.slots is None:
            return ids
        table, count = self._routing_tables(ids.device)
        token = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
        local = table[ids, token % count[ids]] - self.first_physical
        return torch.where((local >= 0) & (local < self.w13.shape[0]), local, -1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        slots = self.local_slots(ids)
        if fused.moe is not None and fused.moe.usable(x):
            return fused.moe.fused_experts(x, self.w13, self.w2, weights, slots)
        return experts_reference(x, self.w13, self.w2, weights, slots)

    def expert_tensors(self, expert: int, part: str) -> list[torch.Tensor]:
        """The views of ``w13``/``w2`` a checkpoint tensor of ``expert`` is copied into
        (``part``: gate, up or down); none when the expert is held by other ranks."""
        slots = [expert] if self.slots is None else self.slots.get(expert, [])
        if part == "down":
            return [self.w2.data[s] for s in slots]
        offset = 0 if part == "gate" else self.intermediate
        return [self.w13.data[s].narrow(0, offset, self.intermediate) for s in slots]
