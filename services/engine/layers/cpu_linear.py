"""Linear layers on the CPU through oneDNN, with each weight packed once after loading.

``F.linear`` on the CPU is MKL's sgemm. On AMD CPUs MKL takes its generic code path: on
this project's AMD EPYC machine (AVX-512) it reached 74-116 GFLOP/s at a decode batch of 16,
where oneDNN with a pre-packed weight reached 255-375 GFLOP/s on the same shapes, same fp32
(``benchmarks/cpu_linear.py``). vLLM's CPU backend packs its weights for oneDNN the same way.
oneDNN picks its kernels by the CPU's instruction set at run time (AVX2, AVX-512, AMX), so
"auto" times both on one of the model's own shapes and keeps the faster: on a CPU where MKL
wins (Intel, where MKL is at home) nothing changes.

Packing replaces a module's ``forward``; the weight it came from is freed unless another
parameter shares it (a lm_head tied to the embedding keeps its one copy for the embedding).
A module keeps ``in_features`` and ``out_features``. The packed weight computes the same
products in another order: results agree with ``F.linear`` to fp32 rounding, not bit for
bit (checked when packing; a layer that does not agree keeps ``F.linear``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onednn", "torch")
_DTYPES = (torch.float32, torch.bfloat16)
# "auto" keeps oneDNN only when it is this much faster than F.linear on the probe shape.
_MIN_SPEEDUP = 1.1
_PROBE_ROWS = 16  # a decode batch


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear:
    """``forward`` of a packed ``nn.Linear``: ``x @ W.T + b`` with oneDNN's packed ``W``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.packed, self.bias, "none", [None], ""
        )


def pack_linears(model: nn.Module, backend: str = "auto") -> int:
    """Run ``model``'s CPU ``nn.Linear`` layers (fp32, bf16) through oneDNN with packed
    weights, per ``backend`` ("torch": leave them; "onednn": always; "auto": when faster
    here). Returns how many layers were packed."""
    if backend not in BACKENDS:
        raise ValueError(f"cpu linear backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or not onednn_available():
        return 0
    named = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and m.weight.dtype in _DTYPES
    ]
    if not named:
        return 0
    linears = [m for _, m in named]
    # The probe: the largest layer of the decoder (the lm_head's shape is one of a kind).
    probe = max((m for name, m in named if "lm_head" not in name), default=linears[0],
                key=lambda m: m.weight.numel())  # fmt: skip
    if backend == "auto" and not _faster(probe):
        logger.info("cpu linear: F.linear is as fast as oneDNN here; weights stay unpacked")
        return 0
    shared = _shared_storage(model)
    packed = 0
    with torch.no_grad():
        for m in linears:
            fwd = OneDNNLinear(m.weight, m.bias)
            if not _agrees(m, fwd):
                logger.warning("cpu linear: oneDNN disagrees with F.linear on %s; left unpacked", m)
                continue
            m.forward = fwd  # type: ignore[method-assign,assignment]
            if m.weight.data_ptr() not in shared:
                m.weight = nn.Parameter(torch.empty(0, dtype=m.weight.dtype), requires_grad=False)
            packed += 1
    logger.info("cpu linear: %d layers run through oneDNN with packed weights", packed)
    return packed


def _shared_storage(model: nn.Module) -> set[int]:
    """Data pointers held by more than one parameter (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}


def _probe_input(m: nn.Linear) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(_PROBE_ROWS, m.in_features, generator=gen).to(m.weight.dtype)


def _agrees(m: nn.Linear, fwd: OneDNNLinear) -> bool:
    x = _probe_input(m)
    ref = nn.functional.linear(x, m.weight, m.bias).float()
    got = fwd(x).float()
    tol = 1e-4 if m.weight.dtype == torch.float32 else 2e-2
    scale = float(ref.abs().max()) or 1.0
    return got.shape == ref.shape and bool(((got - ref).abs() <= tol * scale).all())


def _faster(m: nn.Linear) -> bool:
    """Whether oneDNN beats F.linear on ``m`` at a decode batch, on this CPU."""
    x = _probe_input(m)
    fwd = OneDNNLinear(m.weight, m.bias)
    t_torch = _best_time(lambda: nn.functional.linear(x, m.weight, m.bias))
    t_onednn = _best_time(lambda: fwd(x))
    logger.info(
        "cpu linear probe %dx%d->%d: F.linear %.0f us, oneDNN %.0f us",
        _PROBE_ROWS, m.in_features, m.out_features, t_torch * 1e6, t_onednn * 1e6,
    )  # fmt: skip
    return t_torch >= _MIN_SPEEDUP * t_onednn


def _best_time(fn: Callable[[], torch.Tensor], reps: int = 5, inner: int = 5) -> float:
    """Best of ``reps`` timings of ``inner`` calls (the fastest is the least disturbed)."""
    with torch.no_grad():
        fn()  # first call: kernel selection, caches
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            best = min(best, (time.perf_counter() - t) / inner)
    return best
