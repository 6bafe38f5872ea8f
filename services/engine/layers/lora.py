"""Batched LoRA on a linear layer: the base layer's output plus each row's adapter delta.

The wrapper calls whatever the base layer's ``forward`` is (``F.linear``, or a oneDNN packed
weight from cpu_linear.py, which frees ``.weight``) and adds ``B_s A_s x`` for the rows of
each adapter slot ``s`` in the batch. Every slot holds its factors in fixed tensors
(``a``: [slots, shards * rank, in], ``b``: [slots, out, shards * rank]); a fused layer's
shards occupy their own rank columns of ``a`` and rows of ``b`` (block diagonal), so one
pair of matmuls serves q, k and v together.

On CUDA (with triton) a mixed batch runs ``triton_lora``'s shrink / expand kernels over the
rows grouped by slot (``LoRABatch.segments``). On CPU, three ways to apply the deltas of a
mixed batch (``benchmarks/lora.py`` measures them):
grouped (rows of one adapter gathered, two small matmuls per adapter, added back), padded
(every slot's rows gathered into one [slots, rows, in] tensor, padded with a zero row, two
bmm over all slots, one scatter-add) and gathered (each row's own factors copied out, two
bmm). The manager picks padded when the padding is at most the batch again (decode batches:
a fixed handful of kernels whatever the number of adapters), else grouped (a prefill chunk
of one adapter beside a few decodes). Gathered copies [rows, rank, in] per layer and lost at
every size measured; it is kept for the benchmark only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# (slot, rows of the batch that use it; None: every row)
Group = tuple[int, torch.Tensor | None]


@dataclass
class LoRABatch:
    """Which rows of the current forward pass use which adapter slot (shared by every
    wrapped layer; set by the model runner around each forward pass)."""

    groups: list[Group] = field(default_factory=list)
    # Or, the padded plan: (source row of each padded row, T for the zero row; its
    # destination row; padded rows per slot). Its padding rows read zeros and add zeros.
    padded: tuple[torch.Tensor, torch.Tensor, int] | None = None
    # Or, on CUDA: the rows of each slot for the Triton kernels (a triton_lora.Segments).
    segments: Any = None
    kernels: Any = None  # the triton_lora module that runs ``segments`` (cuda_kernels)


def cuda_kernels(device: torch.device) -> Any:
    """The ``triton_lora`` module for a CUDA device when triton is installed and the fused
    kernels are on (``layers/fused.py``), else None: the torch paths."""
    if device.type != "cuda":
        return None
    from services.engine.layers import fused

    if fused.ops is None:
        return None
    from services.engine.layers import triton_lora

    return triton_lora


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
        # The CPU paths' B: per shard, only its rank columns, transposed ([slots, rank, rows]):
        # the block-diagonal ``b`` of a fused layer is mostly zeros (2/3 of q/k/v's), and a
        # decode step reads every slot's factors from memory. Used when the shards tile the
        # output in order (every packed layer); else ``b``.
        self.b_t = [torch.zeros(slots, rank, size, dtype=dtype, device=device)
                    for _, size in self.shards]  # fmt: skip
        self.tiled = all(o == sum(n for _, n in self.shards[:i])
                         for i, (o, _) in enumerate(self.shards))  # fmt: skip
        # Output rows [lo, hi) of each shard, for the expand kernel to skip the zero blocks.
        bounds = [[o for o, _ in self.shards], [o + n for o, n in self.shards]]
        self.shard_bounds = torch.tensor(bounds, dtype=torch.int32, device=device)

    def set_slot(
        self, slot: int, a: list[torch.Tensor | None], b: list[torch.Tensor | None]
    ) -> None:
        """Put one adapter's factors (per shard; None: the adapter leaves that shard alone)
        into ``slot``."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for b_t in self.b_t:
            b_t[slot].zero_()
        for i, ((offset, size), a_i, b_i) in enumerate(zip(self.shards, a, b, strict=True)):
            if a_i is None or b_i is None:
                continue
            r = a_i.shape[0]
            col = i * self.rank
            self.a[slot, col : col + r].copy_(a_i)
            self.b[slot, offset : offset + size, col : col + r].copy_(b_i)
            self.b_t[i][slot, :r].copy_(b_i.T)

    def _expand(self, xa: torch.Tensor, slot: int | None = None) -> torch.Tensor:
        """``xa`` [..., rows, width] times B^T of every slot (``slot``: one slot's), one
        product per shard on its own rank columns."""
        if not self.tiled:
            b = self.b if slot is None else self.b[slot]
            return xa @ b.transpose(-1, -2)
        r = self.rank
        parts = [xa[..., i * r : (i + 1) * r] @ (b_t if slot is None else b_t[slot])
                 for i, b_t in enumerate(self.b_t)]  # fmt: skip
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if (seg := self.batch.segments) is not None:
            ops = self.batch.kernels
            xa = ops.lora_shrink(x if x.stride(-1) == 1 else x.contiguous(), self.a, seg)
            return ops.lora_expand_(y, xa, self.b, seg, self.shard_bounds, self.rank)
        if self.batch.padded is not None:
            src, dst, m = self.batch.padded
            slots = self.a.shape[0]
            xp = F.pad(x, (0, 0, 0, 1)).index_select(0, src).view(slots, m, -1)
            delta = self._expand(torch.bmm(xp, self.a.transpose(1, 2)))
            return y.index_add_(0, dst, delta.view(slots * m, -1))
        for slot, rows in self.batch.groups:
            a = self.a[slot]
            if rows is None:
                y += self._expand(x @ a.T, slot)
            else:
                y.index_add_(0, rows, self._expand(x.index_select(0, rows) @ a.T, slot))
        return y


def gathered_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor):
    """The other way to apply a mixed batch: each row's factors gathered (``slots`` [T],
    one slot per row), two batched matmuls. Kept for the benchmark's comparison."""
    xa = torch.bmm(x.unsqueeze(1), a.index_select(0, slots).transpose(1, 2))
    return torch.bmm(xa, b.index_select(0, slots).transpose(1, 2)).squeeze(1)
