"""WorkerConfig's checks of values that pass every bound (services/worker/config.py)."""

from __future__ import annotations

import pytest

from services.worker.config import WorkerConfig


@pytest.mark.parametrize("name", ["engine_stall_s", "kv_write_grace_s", "drain_timeout_s"])
def test_a_nan_duration_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a number"):
        WorkerConfig(**{name: float("nan")})
    WorkerConfig(**{name: 1.0})
