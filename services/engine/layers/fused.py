"""The fused Triton kernels of ``triton_ops`` (and ``triton_moe``, the routed experts of an MoE
layer) when triton is installed beside a GPU build of torch, or None: every caller
keeps its torch path, which CPU (and NPU) runs take. ``EPDSERVE_FUSED_KERNELS=0`` turns them
off (the torch path on CUDA too, e.g. to compare).

Checked against the torch path by ``tests/engine/test_cuda.py::test_fused_ops_match_torch`` on
the GPU and in the Triton interpreter on CPU (``tests/engine/test_triton_interpret.py``); the
GPU correctness tests (greedy equal to transformers in float32) pass with them on.
"""

from __future__ import annotations

import os
from typing import Any

import torch

ops: Any = None  # the triton_ops module when on
moe: Any = None  # the triton_moe module (fused mixture-of-experts) when on
# NOTE: only a CUDA (or ROCm) build of torch can run them: a CPU build's worker would import
# triton (~0.2 s of CPU at each start, benchmarks/RESULTS.md) for nothing. The interpreter
# checks (tests/engine/triton_interpret_check.py) import the modules themselves.
_gpu_build = torch.version.cuda is not None or torch.version.hip is not None
if _gpu_build and os.environ.get("EPDSERVE_FUSED_KERNELS", "1") != "0":
    try:
        import services.engine.layers.triton_moe
        import services.engine.layers.triton_ops

        ops = services.engine.layers.triton_ops
        moe = services.engine.layers.triton_moe
    except ImportError:  # no triton: the CPU install
        pass


def on_cuda_rows(x: torch.Tensor) -> bool:
    """Whether ``x`` goes through a fused kernel (a CUDA tensor with contiguous rows)."""
    return ops is not None and ops.usable(x)
