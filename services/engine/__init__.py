"""The epdserve inference engine: paged KV cache, continuous batching, vLLM-style API.

Heavy modules (torch, transformers) load lazily, so that importing a light submodule such
as ``services.engine.sampling_params`` from the router costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.engine.async_engine import AsyncLLMEngine
    from services.engine.config import EngineConfig
    from services.engine.llm import LLM
    from services.engine.llm_engine import LLMEngine
    from services.engine.outputs import CompletionOutput, EngineStats, RequestOutput
    from services.engine.sampling_params import SamplingParams, StructuredOutputsParams

_EXPORTS = {
    "AsyncLLMEngine": "services.engine.async_engine",
    "EngineConfig": "services.engine.config",
    "LLM": "services.engine.llm",
    "LLMEngine": "services.engine.llm_engine",
    "EngineStats": "services.engine.outputs",
    "CompletionOutput": "services.engine.outputs",
    "RequestOutput": "services.engine.outputs",
    "SamplingParams": "services.engine.sampling_params",
    "StructuredOutputsParams": "services.engine.sampling_params",
}

__all__ = [
    "AsyncLLMEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLM",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'services.engine' has no attribute {name!r}")
