"""Build a model's modules on the meta device without running their weight initializers, then
give them uninitialized memory on the real device.

NOTE: the engine builds each model under ``torch.device("meta")``, then ``to_empty`` and loads
the checkpoint (or dummy weights), so whatever an initializer writes is thrown away. On meta,
``nn.Embedding``'s ``normal_`` runs through torch's Python decompositions, whose first call
imports ``torch._dynamo`` (and sympy with it): ~0.5 s of CPU at every worker start, several
seconds on a loaded machine (benchmarks/RESULTS.md, worker start). Like transformers'
``no_init_weights``, the ``torch.nn.init`` functions are no-ops for the build's duration.
The same decompositions run for ``Module.to_empty`` (``empty_like`` of a meta tensor), which
imports sympy: ``to_device`` allocates from the sizes instead.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_INITIALIZERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
    "sparse_",
)  # fmt: skip
# NOTE: the patch is process-wide: a module built on a real device by another thread during a
# build would keep uninitialized weights. Engines build one model at a time, under this lock.
_lock = threading.Lock()


def _keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def meta_build() -> Iterator[None]:
    """``torch.device("meta")`` with ``torch.nn.init``'s initializers off."""
    with _lock, torch.device("meta"):
        saved = {name: getattr(torch.nn.init, name) for name in _INITIALIZERS}
        try:
            for name in _INITIALIZERS:
                setattr(torch.nn.init, name, _keep)
            yield
        finally:
            for name, fn in saved.items():
                setattr(torch.nn.init, name, fn)


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model.to_empty(device=device)``: each meta tensor becomes uninitialized memory of the
    same size, strides and dtype on ``device``."""

    def empty(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)

    return model._apply(empty)
