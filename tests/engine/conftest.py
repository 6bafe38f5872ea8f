"""Fixtures the engine tests share: the tiny llama's folder and an engine of it without
speculation (the reference the speculative engines are compared with)."""

from __future__ import annotations

import pytest

# Each engine's KV budget in the speculative tests (a draft model gets as many blocks).
KV_BYTES = 4 << 20


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    """The tiny random llama's folder."""
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def plain(model):
    """An engine of ``model`` without speculation (float32, block size 4)."""
    from services.engine import LLM

    return LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES).engine
