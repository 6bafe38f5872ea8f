"""DeepSeek-R1 (and QwQ): reasoning up to ``</think>``, with or without an opening tag."""

from __future__ import annotations

from services.router.features.reasoning.base import ThinkTagParser


class DeepSeekR1ReasoningParser(ThinkTagParser):
    """The chat template opens ``<think>`` in the prompt, so the output starts inside the
    reasoning; an output that never writes ``</think>`` is all reasoning."""

    name = "deepseek_r1"
    implicit_start = True
