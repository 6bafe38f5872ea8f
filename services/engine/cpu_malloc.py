"""glibc's malloc keeps the memory a CPU step frees, instead of giving it back to the kernel.

Every op of a step allocates its output anew (a 2,048-token prefill step of the default model
allocates ~75 MB a layer: the gate_up output alone is 25 MB) and frees it a few ops later.
glibc serves a chunk above its mmap threshold with a fresh ``mmap`` and unmaps it on free, and
it gives the top of a heap back to the kernel once more than its trim threshold lies free
there; both thresholds start small (128 KiB) and only grow with what has been freed. So the
next step's tensors fault their pages in again, 4 KiB at a time, each zeroed by the kernel: on
the offline work (32 x 128/16) ~250-320 thousand minor faults a run, ~0.8 s of system CPU in
~12 s. With the mmap threshold at its largest (32 MiB: chunks below it come from the heap) and
a trim threshold the steps never reach, a warm run faults nothing and its system CPU falls to
~0.2 s (benchmarks/RESULTS.md, perf10). vLLM's CPU backend preloads tcmalloc for the same
reason. The cost: a process keeps its peak of freed heap memory (the largest step's
activations; chunks of 32 MiB and more are still mapped and unmapped each time). The model
runner sets this once its weights are loaded and packed, and hands what is free then (the
unpacked weights) back to the kernel first, so that the process does not keep a second copy
of the weights. ``EPDSERVE_CPU_MALLOC=0`` leaves glibc's defaults (to compare).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
MMAP_THRESHOLD = 32 << 20
# Free memory at a heap's top kept before trimming: above any step's activations.
TRIM_THRESHOLD = 1 << 30
# What a thread's arena keeps beyond its need when it grows or trims: a heap of a thread's
# arena (the worker's step thread) is otherwise deleted as soon as it is wholly free,
# whatever the trim threshold (glibc's heap_trim).
TOP_PAD = 64 << 20

_done = False


def keep_freed_memory() -> bool:
    """Give the memory free now back to the kernel (``malloc_trim``), then set the thresholds
    above for this process (once); True when glibc took them. Not on another libc (musl has
    no such tuning), or with ``EPDSERVE_CPU_MALLOC=0``."""
    global _done
    if not sys.platform.startswith("linux") or os.environ.get("EPDSERVE_CPU_MALLOC") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    # glibc only: its mallopt's parameters are the ones above.
    if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return False
    mallopt, trim = libc.mallopt, libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    if _done:
        return True
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_TOP_PAD, TOP_PAD),
        )
    )
    if not ok:
        logger.warning("cpu malloc: glibc refused a mallopt setting; freed memory may be unmapped")
    _done = ok
    return ok
