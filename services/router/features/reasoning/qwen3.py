"""Qwen3: reasoning between ``<think>`` and ``</think>`` when the output opens with ``<think>``."""

from __future__ import annotations

from services.router.features.reasoning.base import ThinkTagParser


class Qwen3ReasoningParser(ThinkTagParser):
    """The model writes ``<think>`` itself (none with ``enable_thinking: false``): an output
    that does not start with it is all content."""

    name = "qwen3"
    implicit_start = False
