"""A C kernel for batched LoRA decode rows on the CPU, built on first use with the system's C
compiler and called through ctypes (no torch headers: it builds in about a second).

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
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 120.0
# EPDSERVE_CPU_LORA_KERNEL=0 keeps the torch plans (for A/B runs and as an escape hatch).
ENV_SWITCH = "EPDSERVE_CPU_LORA_KERNEL"

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define MAX_SHARDS 8
#define COL_BLOCK 64
#define W_BLOCK 8

typedef struct {
    const float *a;                 /* [slots, width, in] */
    int64_t in_features, width, rank, shards, out_features;
    const float *bt[MAX_SHARDS];    /* per shard: [slots, rank, size] */
    int64_t offset[MAX_SHARDS];     /* per shard: first output column */
    int64_t size[MAX_SHARDS];       /* per shard: output columns */
} Layer;

typedef struct {
    const int64_t *order;  /* batch rows, slot by slot */
    const int64_t *starts; /* [slots] */
    const int64_t *counts; /* [slots] */
    int64_t slots, rows;   /* rows: len(order) */
    float *xa;             /* scratch [rows, width] (position in order) */
} Batch;

static void shrink_block(const Layer *L, const Batch *B, const float *x, int64_t ldx,
                         int64_t s, int64_t w0, int64_t w1) {
    const int64_t in = L->in_features, width = L->width;
    const int64_t n = B->counts[s], first = B->starts[s];
    const int64_t *rows = B->order + first;
    const float *A = L->a + s * width * in;
    for (int64_t j = 0; j < n; j += 4) {
        const int64_t m = n - j < 4 ? n - j : 4;
        const float *x0 = x + rows[j] * ldx;
        const float *x1 = x + rows[j + (m > 1)] * ldx;
        const float *x2 = x + rows[j + (m > 2 ? 2 : 0)] * ldx;
        const float *x3 = x + rows[j + (m > 3 ? 3 : 0)] * ldx;
        for (int64_t w = w0; w < w1; w++) {
            const float *ar = A + w * in;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            #pragma omp simd reduction(+:s0,s1,s2,s3)
            for (int64_t k = 0; k < in; k++) {
                const float v = ar[k];
                s0 += v * x0[k]; s1 += v * x1[k]; s2 += v * x2[k]; s3 += v * x3[k];
            }
            float *out = B->xa + (first + j) * width + w;
            out[0] = s0;
            if (m > 1) out[width] = s1;
            if (m > 2) out[2 * width] = s2;
            if (m > 3) out[3 * width] = s3;
        }
    }
}

static void expand_block(const Layer *L, const Batch *B, float *y, int64_t ldy,
                         int64_t s, int64_t i, int64_t c0, int64_t c1) {
    const int64_t rank = L->rank, width = L->width, size = L->size[i];
    const int64_t n = B->counts[s], first = B->starts[s];
    const float *bt = L->bt[i] + s * rank * size;
    float acc[COL_BLOCK];
    for (int64_t j = 0; j < n; j++) {
        float *yr = y + B->order[first + j] * ldy + L->offset[i] + c0;
        const float *xj = B->xa + (first + j) * width + i * rank;
        const int64_t cb = c1 - c0;
        for (int64_t c = 0; c < cb; c++) acc[c] = 0.f;
        for (int64_t k = 0; k < rank; k++) {
            const float v = xj[k];
            const float *br = bt + k * size + c0;
            #pragma omp simd
            for (int64_t c = 0; c < cb; c++) acc[c] += v * br[c];
        }
        #pragma omp simd
        for (int64_t c = 0; c < cb; c++) yr[c] += acc[c];
    }
}

/* y[rows] += the LoRA delta of each row's slot. */
void lora_apply(const Layer *L, const Batch *B, const float *x, int64_t ldx, float *y,
                int64_t ldy, int threads) {
    const int64_t slots = B->slots;
    const int64_t wblocks = (L->width + W_BLOCK - 1) / W_BLOCK;
    int64_t cblocks = 0;
    for (int64_t i = 0; i < L->shards; i++) cblocks += (L->size[i] + COL_BLOCK - 1) / COL_BLOCK;
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < slots * wblocks; t++) {
            const int64_t s = t / wblocks, wb = t % wblocks;
            if (!B->counts[s]) continue;
            const int64_t w0 = wb * W_BLOCK;
            const int64_t w1 = w0 + W_BLOCK < L->width ? w0 + W_BLOCK : L->width;
            shrink_block(L, B, x, ldx, s, w0, w1);
        }
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < slots * cblocks; t++) {
            const int64_t s = t / cblocks;
            int64_t cbk = t % cblocks, i = 0;
            if (!B->counts[s]) continue;
            while (cbk >= (L->size[i] + COL_BLOCK - 1) / COL_BLOCK) {
                cbk -= (L->size[i] + COL_BLOCK - 1) / COL_BLOCK;
                i++;
            }
            const int64_t c0 = cbk * COL_BLOCK;
            const int64_t c1 = c0 + COL_BLOCK < L->size[i] ? c0 + COL_BLOCK : L->size[i];
            expand_block(L, B, y, ldy, s, i, c0, c1);
        }
    }
}
"""

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


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    words = set(cpu.split())
    if {"avx2", "fma"} <= words:  # NOTE: not -march=native: the cache may be shared by CPUs
        flags += ["-mavx2", "-mfma"]
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "epdserve" / "kernels"


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.info("cpu lora kernel: no C compiler; the torch plans run LoRA")
        return None
    flags = _flags()
    key = hashlib.sha256((_SOURCE + " ".join(flags) + cc).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_lora-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "cpu_lora.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / target.name
            cmd = [cc, *flags, str(src), "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                logger.warning("cpu lora kernel: build failed (%s); the torch plans run LoRA",
                               done.stderr.strip()[-500:])  # fmt: skip
                return None
            os.replace(out, target)  # atomic: another process may build the same file
    # NOTE: torch is imported, so its libgomp.so.1 is loaded: the library binds to it.
    lib = ctypes.CDLL(str(target))
    lib.lora_apply.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]  # fmt: skip
    lib.lora_apply.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernel library, or None (no compiler, a failed build, or switched off)."""
    global _lib, _tried
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError) as exc:
                logger.warning("cpu lora kernel: %s; the torch plans run LoRA", exc)
                _lib = None
        return _lib


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
