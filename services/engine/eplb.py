"""Expert placement for expert parallelism, and expert load balancing (EPLB).

A placement lists, per rank, the logical experts its physical slots hold; an expert may be
held by several ranks (a replica), and a token routed to it goes to replica
``token index % replicas`` (every rank computes the same choice: the router is replicated).

``rebalance`` is DeepSeek's EPLB algorithm (deepseek-ai/EPLB, the "global" policy that
xLLM and vLLM use when experts are not grouped by node): give the spare slots, one at a
time, to the expert with the most tokens per replica, then pack the physical experts onto
the ranks heaviest first, each to the least loaded rank with a free slot.

A worker's placements (one per sparse layer) are kept in a JSON file
(``EngineConfig.eplb_placement``): loaded at start-up when it exists, written after every
re-placement, so that a restarted worker starts balanced (``save_placements`` /
``load_placements``; ``{"layers": [{"num_experts": E, "ranks": [[expert, ...], ...]}, ...]}``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """``ranks[r]``: the logical expert of each physical slot of rank ``r`` (equal lengths)."""

    num_experts: int
    ranks: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        held = {e for rank in self.ranks for e in rank}
        if held != set(range(self.num_experts)):
            raise ValueError(f"a placement must hold every expert of {self.num_experts}")
        if len({len(r) for r in self.ranks}) != 1:
            raise ValueError("every rank of a placement holds as many experts")

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> ExpertPlacement:
        """Experts ``[r * E/N, (r+1) * E/N)`` on rank ``r`` (no replicas)."""
        if num_experts % num_ranks:
            raise ValueError(
                f"expert parallelism over {num_ranks} ranks needs the number of experts "
                f"({num_experts}) to be a multiple of it"
            )
        n = num_experts // num_ranks
        return cls(num_experts, tuple(tuple(range(r * n, r * n + n)) for r in range(num_ranks)))

    @property
    def slots_per_rank(self) -> int:
        return len(self.ranks[0])

    def replicas(self) -> list[list[int]]:
        """Per logical expert, its physical ids (rank * slots_per_rank + slot)."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for r, rank in enumerate(self.ranks):
            for s, e in enumerate(rank):
                out[e].append(r * self.slots_per_rank + s)
        return out

    def rank_loads(self, expert_tokens: torch.Tensor) -> torch.Tensor:
        """Tokens per rank when each expert's tokens split evenly over its replicas."""
        counts = torch.tensor([len(p) for p in self.replicas()], dtype=torch.float64)
        per_replica = expert_tokens.double() / counts
        return torch.stack([per_replica[list(rank)].sum() for rank in self.ranks])


def placements_to_json(placements: list[ExpertPlacement]) -> dict[str, Any]:
    return {
        "layers": [
            {"num_experts": p.num_experts, "ranks": [list(r) for r in p.ranks]} for p in placements
        ]
    }


def placements_from_json(data: Any) -> list[ExpertPlacement]:
    """The placements of ``placements_to_json``'s form; ValueError for anything else."""
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not layers:
        raise ValueError('an expert placement is {"layers": [{"num_experts": E, "ranks": ...}]}')
    out = []
    for i, layer in enumerate(layers):
        try:
            ranks = tuple(tuple(int(e) for e in rank) for rank in layer["ranks"])
            out.append(ExpertPlacement(int(layer["num_experts"]), ranks))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"expert placement of sparse layer {i}: {exc}") from None
    return out


def load_placements(path: str) -> list[ExpertPlacement] | None:
    """The placements saved in ``path``; None when there is no such file (yet)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"expert placement file {path}: {exc}") from None
    try:
        return placements_from_json(data)
    except ValueError as exc:
        raise ValueError(f"expert placement file {path}: {exc}") from None


def save_placements(path: str, placements: list[ExpertPlacement]) -> None:
    """Write ``placements`` to ``path`` atomically (a reader never sees half a file; workers
    sharing the file each load the last one written)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".eplb-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(placements_to_json(placements), f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def imbalance(rank_loads: torch.Tensor) -> float:
    """max / mean tokens per rank (1.0: perfectly balanced)."""
    mean = float(rank_loads.mean())
    return float(rank_loads.max()) / mean if mean > 0 else 1.0


def rebalance(expert_tokens: torch.Tensor, num_ranks: int, num_slots: int) -> ExpertPlacement:
    """DeepSeek EPLB for one layer: ``num_slots`` physical experts (>= experts, a multiple of
    ``num_ranks``) placed from the recorded tokens per logical expert."""
    num_experts = expert_tokens.numel()
    if num_slots < num_experts or num_slots % num_ranks:
        raise ValueError(
            f"{num_slots} expert slots cannot hold {num_experts} experts evenly on {num_ranks} ranks"
        )
    load = expert_tokens.double().clamp_min(0)
    # 1. Replicate: each spare slot to the expert with the most tokens per replica.
    replicas = [1] * num_experts
    for _ in range(num_slots - num_experts):
        e = int(torch.argmax(load / torch.tensor(replicas, dtype=torch.float64)))
        replicas[e] += 1
    items = [(float(load[e]) / replicas[e], e) for e in range(num_experts)
             for _ in range(replicas[e])]  # fmt: skip
    # 2. Balanced packing: heaviest first, to the least loaded rank with room (and, where it
    # can, not one already holding that expert: a replica on the same rank adds nothing).
    per_rank = num_slots // num_ranks
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    loads = [0.0] * num_ranks
    for weight, e in sorted(items, key=lambda it: (-it[0], it[1])):
        room = [r for r in range(num_ranks) if len(ranks[r]) < per_rank]
        fresh = [r for r in room if e not in ranks[r]] or room
        r = min(fresh, key=lambda r: (loads[r], r))
        ranks[r].append(e)
        loads[r] += weight
    return ExpertPlacement(num_experts, tuple(tuple(sorted(r)) for r in ranks))
