"""The CPU KV budget of an engine given none: 1 GiB, or EPDSERVE_CPU_KV_BYTES (the suite sets
it small in conftest.py for itself and every process it starts)."""

from __future__ import annotations

import pytest

from services.engine import LLM
from services.engine.model_runner import (
    CPU_KV_BYTES_ENV,
    DEFAULT_CPU_KV_BYTES,
    default_cpu_kv_bytes,
)


def test_the_default_is_one_gib_without_the_variable(monkeypatch) -> None:
    monkeypatch.delenv(CPU_KV_BYTES_ENV, raising=False)
    assert default_cpu_kv_bytes() == DEFAULT_CPU_KV_BYTES == 1 << 30
    monkeypatch.setenv(CPU_KV_BYTES_ENV, " ")
    assert default_cpu_kv_bytes() == 1 << 30


@pytest.mark.parametrize("bad", ["0", "-5", "1e6", "lots"])
def test_a_bad_value_is_a_clear_error(monkeypatch, bad: str) -> None:
    monkeypatch.setenv(CPU_KV_BYTES_ENV, bad)
    with pytest.raises(ValueError, match=CPU_KV_BYTES_ENV):
        default_cpu_kv_bytes()


def test_an_engine_without_a_budget_takes_the_variable(monkeypatch, tiny_model_dir) -> None:
    monkeypatch.setenv(CPU_KV_BYTES_ENV, str(1 << 20))
    runner = LLM(str(tiny_model_dir("llama")), block_size=16).engine.runner
    assert runner.kv_cache.nbytes <= 1 << 20 < runner.kv_cache.nbytes + runner.bytes_per_block
    # A budget of its own wins over the variable.
    runner = LLM(str(tiny_model_dir("llama")), block_size=16, kv_cache_bytes=2 << 20).engine.runner
    assert 1 << 20 < runner.kv_cache.nbytes <= 2 << 20
