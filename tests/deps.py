"""Optional test dependencies: a skip on a developer's machine, a failure in CI.

``scripts/setup.sh`` installs every one of them (``.[dev,cpu]`` and the Debian libraries
Mooncake links), so in CI (``CI=true``, as GitHub Actions and most runners set it) a missing
one means the set-up broke: the modules that need it must fail, not skip, or the PD / EPD /
kvstore / chart coverage would vanish from a green run without anyone noticing.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

CI_VALUES = ("1", "true", "yes")

# What provides each optional module (the ``reason`` of a skip or a CI failure).
MOONCAKE = (
    "Mooncake is not installed: pip install -e '.[cpu]' (Debian: libibverbs1 ibverbs-providers)"
)
HELM = "helm-python-sdk (Helm's engine) is not installed: pip install -e '.[dev]'"
KUBERNETES_VALIDATE = "kubernetes-validate is not installed: pip install -e '.[dev]'"
PIL = "pillow is not installed: pip install -e ."
TRITON = "triton is not installed: pip install -e '.[dev]'"
OTEL = "the OpenTelemetry SDK and OTLP exporter are not installed: pip install -e '.[dev]'"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def require(module: str, reason: str) -> ModuleType:
    """``module`` imported; otherwise the calling test (or, at module level, the whole module)
    skips, or fails under ``CI=true``. ``reason`` says what provides it (the constants above)."""
    if not in_ci():
        return pytest.importorskip(module, reason=reason)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        error = str(exc)
    # Outside the except block: the failure shows without the ImportError's traceback.
    pytest.fail(f"CI=true and {module} cannot be imported ({error}): {reason}", pytrace=False)
