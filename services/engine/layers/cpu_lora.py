"""A C kernel for batched LoRA decode rows on the CPU (``csrc/cpu_lora.c``), built on first use
by ``native.library`` with the system's C compiler and called through ctypes.

Why: a decode step of SmolLM2-135M with 8 rank-16 adapters reads 156 MB of factors. The torch
plans of ``layers/lora.py`` run ~780 small ops a step (gather, padded ``bmm`` pairs with 4 rows
a slot, ``index_add_``): at one thread 25 ms a step where streaming the factors takes ~7 ms
(``benchmarks/lora.py --layers``; RESULTS.md). One call per wrapped layer here reads each
used slot's ``A`` and ``B`` once, applies them to all of the slot's rows while they sit in the
cache, and adds the expand straight into the base layer's output: no gather, no padding rows,
no temporaries.

For each slot ``s`` with rows ``order[starts[s] : starts[s] + counts[s]]``:
shrink ``xa[j] = A_s x[row_j]`` ([width] per row), then per shard ``i``
``y[row_j, off_i : off_i + size_i] += xa[j, i*rank : (i+1)*rank] @ Bt_i[s]``. The work is
split over OpenMP threads by (slot, block of A's rows) and (slot, shard, block of columns):
each output element is written by one thread. The library links ``libgomp.so.1``, the soname
torch's own OpenMP runtime has, so it shares torch's thread pool and its thread count.

Float32 only; anything else (or no compiler, or a build that fails) leaves the torch plans.
Results equal the torch plans to fp32 rounding (sums in another order), not bit for bit.
"""

from __future__ import annotations

import ctypes

import torch

from services.engine.layers import native

# EPDSERVE_CPU_LORA_KERNEL=0 keeps the torch plans (for A/B runs and as an escape hatch).
ENV_SWITCH = "EPDSERVE_CPU_LORA_KERNEL"

MAX_SHARDS = 8


class Layer(ctypes.Structure):
    _fields_ = [
        ("a", ctypes.c_void_p),
        ("in_features", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("shards", ctypes.c_int64),
        ("out_features", ctypes.c_int64),
        ("bt", ctypes.c_void_p * MAX_SHARDS),
        ("offset", ctypes.c_int64 * MAX_SHARDS),
        ("size", ctypes.c_int64 * MAX_SHARDS),
    ]


class Batch(ctypes.Structure):
    _fields_ = [
        ("order", ctypes.c_void_p),
        ("starts", ctypes.c_void_p),
        ("counts", ctypes.c_void_p),
        ("slots", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("xa", ctypes.c_void_p),
    ]


def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with ``lora_apply``'s signature set (once: ``native.kernel`` memoises it)."""
    lib.lora_apply.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int]  # fmt: skip
    lib.lora_apply.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernel library (``csrc/cpu_lora.c``, built by ``native.library``), or None (no
    compiler, a failed build, or switched off)."""
    return native.kernel("cpu_lora", _typed, ENV_SWITCH)


class CPUSegments:
    """The adapter rows of one forward pass, slot by slot, as the kernel reads them."""

    def __init__(self, rows_of_slot: list[list[int]], max_width: int) -> None:
        counts = [len(r) for r in rows_of_slot]
        starts = [sum(counts[:s]) for s in range(len(counts))]
        order = [i for r in rows_of_slot for i in r]
        self.order = torch.tensor(order, dtype=torch.int64)
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.counts = torch.tensor(counts, dtype=torch.int64)
        self.xa = torch.empty(max(len(order), 1) * max_width, dtype=torch.float32)
        self.struct = Batch(self.order.data_ptr(), self.starts.data_ptr(),
                            self.counts.data_ptr(), len(counts), len(order),
                            self.xa.data_ptr())  # fmt: skip
        self.ref = ctypes.byref(self.struct)


def layer_struct(a: torch.Tensor, b_t: list[torch.Tensor], shards: list[tuple[int, int]],
                 rank: int) -> Layer:  # fmt: skip
    """The kernel's view of one wrapped layer's factors (the tensors must outlive it)."""
    if len(shards) > MAX_SHARDS:
        raise ValueError(f"at most {MAX_SHARDS} shards")
    layer = Layer()
    layer.a = a.data_ptr()
    layer.in_features = a.shape[2]
    layer.width = a.shape[1]
    layer.rank = rank
    layer.shards = len(shards)
    layer.out_features = sum(n for _, n in shards)
    for i, ((offset, size), t) in enumerate(zip(shards, b_t, strict=True)):
        layer.bt[i] = t.data_ptr()
        layer.offset[i] = offset
        layer.size[i] = size
    return layer


def apply(lib: ctypes.CDLL, layer: ctypes.Structure, seg: CPUSegments, x: torch.Tensor,
          y: torch.Tensor) -> None:  # fmt: skip
    """``y[rows] += B_s A_s x[rows]`` for every slot ``s`` of ``seg`` (x, y float32, rows
    contiguous)."""
    lib.lora_apply(ctypes.byref(layer), seg.ref, x.data_ptr(), x.stride(0), y.data_ptr(),
                   y.stride(0), torch.get_num_threads())  # fmt: skip
