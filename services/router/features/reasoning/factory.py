"""Find a reasoning parser by name (``--reasoning-parser``, vLLM's names)."""

from __future__ import annotations

import functools
import importlib

from services.router.features.reasoning.base import ReasoningParser

NONE = "none"  # the flag's value that turns reasoning parsing off

# name -> "module:Class"; imported on demand.
_PARSERS = {
    "deepseek_r1": "services.router.features.reasoning.deepseek_r1:DeepSeekR1ReasoningParser",
    "qwen3": "services.router.features.reasoning.qwen3:Qwen3ReasoningParser",
}


def available_reasoning_parsers() -> list[str]:
    return sorted(_PARSERS)


# NOTE: cached: every request asks (serving.ServeRequest.create).
@functools.cache
def reasoning_parser_class(name: str) -> type[ReasoningParser] | None:
    """The parser of ``name``; None for ``none`` (the output is all content)."""
    if name == NONE:
        return None
    try:
        target = _PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown reasoning parser {name!r}; choose from "
            f"{', '.join([NONE, *available_reasoning_parsers()])}"
        ) from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, ReasoningParser)):
        raise TypeError(f"{target} is not a ReasoningParser")
    return cls
