"""Fixtures the cluster tests share across modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def reference(tiny_vl_model_dir) -> dict[int, str]:
    """The offline engine's greedy text of each chat of epd_helpers.CASES on the tiny
    Qwen2-VL (computed once for the test_epd*.py modules)."""
    from epd_helpers import offline_outputs

    return offline_outputs(tiny_vl_model_dir)
