"""Find a tool-call parser by name (``--tool-call-parser``, vLLM's names)."""

from __future__ import annotations

import functools
import importlib

from services.router.features.tool_parsers.base import ToolParser

# name -> "module:Class"; imported on demand.
_PARSERS = {
    "hermes": "services.router.features.tool_parsers.hermes:HermesToolParser",
    "llama3_json": "services.router.features.tool_parsers.llama3_json:Llama3JsonToolParser",
}


def available_tool_parsers() -> list[str]:
    return sorted(_PARSERS)


# NOTE: cached: every request asks (serving.ServeRequest.create).
@functools.cache
def tool_parser_class(name: str) -> type[ToolParser]:
    try:
        target = _PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; choose from {', '.join(available_tool_parsers())}"
        ) from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, ToolParser)):
        raise TypeError(f"{target} is not a ToolParser")
    return cls
