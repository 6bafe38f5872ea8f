"""Batched LoRA on a linear layer: the base layer's output plus each row's adapter delta.

The wrapper calls whatever the base layer's ``forward`` is (``F.linear``, or a oneDNN packed
weight from cpu_linear.py, which frees ``.weight``) and adds ``B_s A_s x`` for the rows of
each adapter slot ``s`` in the batch. Every slot holds its factors in fixed tensors
(``a``: [slots, shards * rank, in], ``b``: [slots, out, shards * rank]); a fused layer's
shards occupy their own rank columns of ``a`` and rows of ``b`` (block diagonal), so one
pair of matmuls serves q, k and v together.

On CUDA (with triton) a mixed batch runs ``triton_lora``'s shrink / expand kernels over the
rows grouped by slot (``LoRABatch.segments``). On CPU, three ways to apply the deltas of a
mixed batch (``benchmarks/lora.py --layers`` times them): runs (each run of consecutive rows
of one adapter, a prefill chunk: one shrink matmul, and each shard's expand added into its
columns of the output by ``addmm_``, no [rows, out] temporaries), padded (every slot's rows
gathered into one [slots, rows, in] tensor, padded with a zero row, two bmm over all slots,
one scatter-add) and grouped (rows of one adapter gathered, two small matmuls per adapter,
added back). The manager picks runs when they average ``MIN_RUN_ROWS`` rows (prefill), else
padded when the padding is at most the batch again (decode batches: a fixed handful of
kernels whatever the number of adapters), else grouped. (Gathering each row's own factors
for a bmm copied [rows, rank, in] per layer and lost at every size measured.) Where the C
kernel of ``cpu_lora.py`` builds (float32), it replaces padded and grouped: one call a layer
that reads each slot's factors once and adds into ``y`` in place (2x faster on a decode step).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from services.engine.layers import cpu_lora

# (slot, rows of the batch that use it; None: every row)
Group = tuple[int, torch.Tensor | None]
# (first row, end row, slot): a run of consecutive rows of one adapter (a prefill chunk)
Run = tuple[int, int, int]


@dataclass
class LoRABatch:
    """Which rows of the current forward pass use which adapter slot (shared by every
    wrapped layer; set by the model runner around each forward pass)."""

    groups: list[Group] = field(default_factory=list)
    # Or, the runs plan: the rows of each adapter as runs of consecutive rows.
    runs: list[Run] = field(default_factory=list)
    # Or, the padded plan: (source row of each padded row, T for the zero row; its
    # destination row; padded rows per slot). Its padding rows read zeros and add zeros.
    padded: tuple[torch.Tensor, torch.Tensor, int] | None = None
    # Or, on CUDA: the rows of each slot for the Triton kernels (a triton_lora.Segments).
    segments: Any = None
    kernels: Any = None  # the triton_lora module that runs ``segments`` (cuda_kernels)
    # Or, on CPU with the C kernel built (cpu_lora.py): the rows of each slot for it.
    cpu: cpu_lora.CPUSegments | None = None
    cpu_lib: ctypes.CDLL | None = None  # the kernel's library (None: the torch plans)


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
        # The C kernel's view of ``a`` and ``b_t`` (their storage never moves: slots are
        # filled in place); float32 CPU layers only.
        self.kernel_layer = None
        if torch.device(device).type == "cpu" and dtype == torch.float32:
            self.kernel_layer = cpu_lora.layer_struct(self.a, self.b_t, self.shards, rank)

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

    def _index_add_delta(
        self, y: torch.Tensor, rows: torch.Tensor, xa: torch.Tensor, slot: int | None = None
    ) -> None:
        """``y[rows] += xa B^T``: ``xa`` [slots, m, width] against every slot's B, or
        [rows, width] against ``slot``'s; each shard's product on its own rank columns,
        added into its own columns of ``y`` (no concatenated [rows, out] temporary)."""
        if not self.tiled:
            b = self.b if slot is None else self.b[slot]
            delta = xa @ b.transpose(-1, -2)
            y.index_add_(0, rows, delta.reshape(-1, delta.shape[-1]))
            return
        r = self.rank
        for i, ((offset, size), b_t) in enumerate(zip(self.shards, self.b_t, strict=True)):
            delta = xa[..., i * r : (i + 1) * r] @ (b_t if slot is None else b_t[slot])
            y[:, offset : offset + size].index_add_(0, rows, delta.reshape(-1, size))

    def _add_delta(self, y: torch.Tensor, x: torch.Tensor, slot: int) -> None:
        """``y += B_slot A_slot x``, each shard's product added into its own columns of
        ``y`` by the matmul itself (no [rows, out] temporary)."""
        xa = x @ self.a[slot].T
        if not self.tiled:
            y.addmm_(xa, self.b[slot].T)
            return
        r = self.rank
        for i, ((offset, size), b_t) in enumerate(zip(self.shards, self.b_t, strict=True)):
            y[:, offset : offset + size].addmm_(xa[:, i * r : (i + 1) * r], b_t[slot])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for lo, hi, slot in self.batch.runs:
            self._add_delta(y[lo:hi], x[lo:hi], slot)
        cpu, lib = self.batch.cpu, self.batch.cpu_lib  # cpu is set only where cpu_lib is
        if cpu is not None and lib is not None and self.kernel_layer is not None:
            if x.stride(-1) != 1:  # the kernel takes any row stride, elements contiguous
                x = x.contiguous()
            if y.stride(-1) != 1:
                y = y.contiguous()
            cpu_lora.apply(lib, self.kernel_layer, cpu, x, y)
            return y
        if (seg := self.batch.segments) is not None:
            ops = self.batch.kernels
            xa = ops.lora_shrink(x if x.stride(-1) == 1 else x.contiguous(), self.a, seg)
            return ops.lora_expand_(y, xa, self.b, seg, self.shard_bounds, self.rank)
        if self.batch.padded is not None:
            src, dst, m = self.batch.padded
            slots = self.a.shape[0]
            xp = F.pad(x, (0, 0, 0, 1)).index_select(0, src).view(slots, m, -1)
            self._index_add_delta(y, dst, torch.bmm(xp, self.a.transpose(1, 2)))
            return y
        for slot, rows in self.batch.groups:
            if rows is None:
                self._add_delta(y, x, slot)
            else:
                xa = x.index_select(0, rows) @ self.a[slot].T
                self._index_add_delta(y, rows, xa, slot)
        return y
