"""The fused Triton kernels of ``triton_ops``, or None: every caller keeps its torch path,
which CPU (and NPU) runs take.

They are off unless ``EPDSERVE_FUSED_KERNELS=1``: their arithmetic is checked against the
torch path in the Triton interpreter (``tests/engine/test_triton_interpret.py``) and by
``tests/engine/test_cuda.py::test_fused_ops_match_torch``, but they have not yet run on a GPU.
Turn them on by default once that test and ``benchmarks/gpu_decode.py`` have.
"""

from __future__ import annotations

import os
from typing import Any

import torch

ops: Any = None  # the triton_ops module when on
if os.environ.get("EPDSERVE_FUSED_KERNELS") == "1":
    try:
        import services.engine.layers.triton_ops

        ops = services.engine.layers.triton_ops
    except ImportError:  # no triton: the CPU install
        pass


def on_cuda_rows(x: torch.Tensor) -> bool:
    """Whether ``x`` goes through a fused kernel (a CUDA tensor with contiguous rows)."""
    return ops is not None and ops.usable(x)
