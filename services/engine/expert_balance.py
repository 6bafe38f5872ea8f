"""Expert load balancing between batches: the tokens each expert received, a new placement
from them (eplb.rebalance), and its application on every rank.

A re-placement runs on the engine's step thread between two steps (``AsyncLLMEngine.call``),
so no request is dropped or paused longer than the reload: every rank rebuilds its expert
tensors for its new slots and reads those experts again from the checkpoint (a rank does not
hold the experts it is given).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from services.engine.eplb import ExpertPlacement, imbalance, rebalance
from services.engine.model_loader import iter_safetensors


@dataclass
class BalanceReport:
    """Max / mean tokens per rank of each sparse layer, under the old and the new placement,
    for the tokens recorded so far."""

    before: list[float]
    after: list[float]
    placements: list[ExpertPlacement]

    @property
    def mean_before(self) -> float:
        return sum(self.before) / len(self.before)

    @property
    def mean_after(self) -> float:
        return sum(self.after) / len(self.after)


def expert_tokens(model: Any) -> torch.Tensor:
    """[sparse layers, experts]: tokens routed to each expert so far (zeros before any)."""
    rows = []
    for block in getattr(model, "moe_blocks", []):
        counts = block.expert_tokens
        n = block.experts.num_experts
        rows.append(torch.zeros(n, dtype=torch.long) if counts is None else counts.cpu())
    return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.long)


def placements(model: Any) -> list[ExpertPlacement]:
    out = [block.experts.placement for block in getattr(model, "moe_blocks", [])]
    if not out or any(p is None for p in out):
        raise ValueError(
            "expert load balancing needs an MoE model with expert parallelism "
            "(enable_expert_parallel and tensor_parallel_size > 1)"
        )
    return out


def place_experts(runner: Any, new: list[ExpertPlacement]) -> None:
    """This rank's side of a re-placement."""
    if runner.config.load_format == "dummy":
        raise ValueError("re-placing experts reads the checkpoint again: not with dummy weights")
    with torch.no_grad():
        runner.model.place_experts(new, runner.tp.rank, iter_safetensors(runner.model_path))


def rebalance_experts(
    runner: Any, send: Callable[[object], None] | None, num_slots: int | None = None
) -> BalanceReport:
    """Place each sparse layer's experts for the recorded load (``num_slots`` physical experts
    in all, a multiple of the ranks; default: as many as now) on every rank: ``send`` hands
    the command to the other ranks, in order with the batches."""
    old = placements(runner.model)
    loads = expert_tokens(runner.model)
    ranks = len(old[0].ranks)
    slots = num_slots or old[0].slots_per_rank * ranks
    new = [rebalance(layer, ranks, slots) for layer in loads]
    report = BalanceReport(
        before=[imbalance(p.rank_loads(layer)) for p, layer in zip(old, loads, strict=True)],
        after=[imbalance(p.rank_loads(layer)) for p, layer in zip(new, loads, strict=True)],
        placements=new,
    )
    if send is not None:
        send(("place", new))
    place_experts(runner, new)
    return report
