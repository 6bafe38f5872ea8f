"""Batched LoRA on a linear layer: the base layer's output plus each row's adapter delta.

The wrapper calls whatever the base layer's ``forward`` is (``F.linear``, or a oneDNN packed
weight from cpu_linear.py, which frees ``.weight``) and adds ``B_s A_s x`` for the rows of
each adapter slot ``s`` in the batch. Every slot holds its factors in fixed tensors
(``a``: [slots, shards * rank, in], ``b``: [slots, out, shards * rank]); a fused layer's
shards occupy their own rank columns of ``a`` and rows of ``b`` (block diagonal), so one
pair of matmuls serves q, k and v together.

Two ways to apply the deltas of a mixed batch (``benchmarks/lora.py`` measures both):
grouped (rows of one adapter gathered, two small matmuls per adapter, added back) and
gathered (each row's factors gathered, two bmm over the batch). Grouped is used: on the CPU
it was faster at every batch measured, and a prefill chunk's rows never copy factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# (slot, rows of the batch that use it; None: every row)
Group = tuple[int, torch.Tensor | None]


@dataclass
class LoRABatch:
    """Which rows of the current forward pass use which adapter slot (shared by every
    wrapped layer; set by the model runner around each forward pass)."""

    groups: list[Group] = field(default_factory=list)


class LoRALinear:
    """``forward`` of a linear layer with LoRA slots (see the module docstring)."""

    def __init__(
        self,
        base: Callable[[torch.Tensor], torch.Tensor],
        shards: dict[Any, tuple[int, int]],  # shard id -> (row offset, rows) of the output
        in_features: int,
        slots: int,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        batch: LoRABatch,
    ) -> None:
        self.base = base
        self.shard_ids = list(shards)  # the packed_modules_mapping ids; [None]: not fused
        self.shards = list(shards.values())
        self.rank = rank
        self.batch = batch
        out = sum(size for _, size in self.shards)
        width = len(self.shards) * rank
        self.a = torch.zeros(slots, width, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(slots, out, width, dtype=dtype, device=device)

    def set_slot(
        self, slot: int, a: list[torch.Tensor | None], b: list[torch.Tensor | None]
    ) -> None:
        """Put one adapter's factors (per shard; None: the adapter leaves that shard alone)
        into ``slot``."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for i, ((offset, size), a_i, b_i) in enumerate(zip(self.shards, a, b, strict=True)):
            if a_i is None or b_i is None:
                continue
            r = a_i.shape[0]
            col = i * self.rank
            self.a[slot, col : col + r].copy_(a_i)
            self.b[slot, offset : offset + size, col : col + r].copy_(b_i)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for slot, rows in self.batch.groups:
            a, b = self.a[slot], self.b[slot]
            if rows is None:
                y += (x @ a.T) @ b.T
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
        return y


def gathered_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor):
    """The other way to apply a mixed batch: each row's factors gathered (``slots`` [T],
    one slot per row), two batched matmuls. Kept for the benchmark's comparison."""
    xa = torch.bmm(x.unsqueeze(1), a.index_select(0, slots).transpose(1, 2))
    return torch.bmm(xa, b.index_select(0, slots).transpose(1, 2)).squeeze(1)
