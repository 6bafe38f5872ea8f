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

from services.engine.eplb import ExpertPlacement, imbalance, rebalance, save_placements
from services.engine.model_loader import iter_safetensors


@dataclass
class BalanceReport:
    """Max / mean tokens per rank of each sparse layer, under the old and the new placement,
    for the tokens recorded so far."""

    before: list[float]
    after: list[float]
    placements: list[ExpertPlacement]
    saved_to: str = ""  # the engine's eplb_placement file, written with them ("": none)

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
    runner: Any,
    send: Callable[[object], None] | None,
    num_slots: int | None = None,
    given: list[ExpertPlacement] | None = None,
) -> BalanceReport:
    """Place each sparse layer's experts for the recorded load (``num_slots`` physical experts
    in all, a multiple of the ranks; default: as many as now), or as ``given``, on every rank:
    ``send`` hands the command to the other ranks, in order with the batches. The engine's
    ``eplb_placement`` file, if any, is written with the new placements."""
    old = placements(runner.model)
    loads = expert_tokens(runner.model)
    ranks = len(old[0].ranks)
    if given is None:
        slots = num_slots or old[0].slots_per_rank * ranks
        new = [rebalance(layer, ranks, slots) for layer in loads]
    else:
        check_fits(given, old)
        new = given
    report = BalanceReport(
        before=[imbalance(p.rank_loads(layer)) for p, layer in zip(old, loads, strict=True)],
        after=[imbalance(p.rank_loads(layer)) for p, layer in zip(new, loads, strict=True)],
        placements=new,
    )
    if runner.config.load_format == "dummy":  # before any rank is told
        raise ValueError("re-placing experts reads the checkpoint again: not with dummy weights")
    if send is not None:
        send(("place", new))
    place_experts(runner, new)
    if runner.config.eplb_placement:
        save_placements(runner.config.eplb_placement, new)
        report.saved_to = runner.config.eplb_placement
    return report


def check_fits(given: list[ExpertPlacement], now: list[ExpertPlacement]) -> None:
    """ValueError unless ``given`` places this model's experts on this worker's ranks."""
    if len(given) != len(now):
        raise ValueError(f"the placement has {len(given)} sparse layers; the model has {len(now)}")
    for i, (g, n) in enumerate(zip(given, now, strict=True)):
        if g.num_experts != n.num_experts or len(g.ranks) != len(n.ranks):
            raise ValueError(
                f"sparse layer {i}: the placement holds {g.num_experts} experts on "
                f"{len(g.ranks)} ranks; the model has {n.num_experts} on {len(n.ranks)}"
            )
