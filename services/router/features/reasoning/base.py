"""The reasoning parser interface, and the ``<think>``/``</think>`` machinery its formats share.

A parser splits one choice's output, fed in arbitrary pieces, into the reasoning (written
first, between the think tags) and the content (the rest, where tool calls may follow). It
must give the same reasoning and content (concatenated) whatever the split of the text: it
holds back text that may still be part of a tag (e.g. a prefix of ``</think>``) until the
next piece decides.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from services.router.features.tool_parsers.base import held_suffix


class ReasoningParser(ABC):
    """Splits one choice's output. One instance per choice: it holds that choice's state."""

    name: ClassVar[str] = ""

    @abstractmethod
    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) decided by the next piece ``text`` of the output; ``final``:
        it is the last piece (nothing is held back after it). Reasoning always comes before
        content: once content has been returned, reasoning stays empty."""


class ThinkTagParser(ReasoningParser):
    """Reasoning between ``<think>`` and ``</think>`` at the start of the output.

    ``implicit_start`` (DeepSeek-R1, whose template opens ``<think>`` in the prompt): the
    output is reasoning from its first character, an opening tag there is dropped, and an
    output that never closes the tag is all reasoning. Otherwise (Qwen3) there is reasoning
    only when the output starts with ``<think>`` (after whitespace); an unclosed tag makes
    the rest reasoning (a cut-off thought, as vLLM treats it), no tag makes all content.
    """

    start_tag: ClassVar[str] = "<think>"
    end_tag: ClassVar[str] = "</think>"
    implicit_start: ClassVar[bool] = False

    def __init__(self) -> None:
        self._state = "start"  # "start" (opening tag undecided) | "reasoning" | "content"
        self._held = ""  # text not yet decided
        self._done = False

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        if self._done:
            return "", ""
        self._done = final
        buf = self._held + text
        self._held = ""
        reasoning = ""
        if self._state == "start":
            opening = buf.lstrip()
            if opening.startswith(self.start_tag):
                self._state = "reasoning"
                buf = opening[len(self.start_tag) :]
            elif self.start_tag.startswith(opening) and not final:
                self._held = buf  # NOTE: whitespace and a tag prefix: wait for more
                return "", ""
            else:
                self._state = "reasoning" if self.implicit_start else "content"
        if self._state == "reasoning":
            end = buf.find(self.end_tag)
            if end < 0:
                keep = 0 if final else held_suffix(buf, self.end_tag)
                self._held = buf[len(buf) - keep :]
                return buf[: len(buf) - keep], ""
            reasoning, buf = buf[:end], buf[end + len(self.end_tag) :]
            self._state = "content"
        return reasoning, buf


def extract_reasoning(parser: ReasoningParser, text: str) -> tuple[str, str]:
    """(reasoning, content) of a whole output."""
    return parser.feed(text, final=True)
