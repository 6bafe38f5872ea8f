"""The tool-call parser interface, and the rules shared by every format (``ToolStream``).

A parser turns a model's output text, fed in arbitrary pieces, into an ordered list of
events: content text to relay, and complete tool calls. It must give the same events
(concatenated) whatever the split of the text; it holds back text that may still turn out
to be part of a tool call (e.g. a prefix of ``<tool_call>``) until the next piece decides.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class ParsedCall:
    """One tool call found in the output."""

    name: str
    arguments: str  # a JSON object, as text


Event = str | ParsedCall  # content text, or a complete tool call


class ToolParser(ABC):
    """Parses one choice's output. One instance per choice: it holds that choice's state."""

    name: ClassVar[str] = ""

    @abstractmethod
    def feed(self, text: str) -> list[Event]:
        """Events decided by the output so far, ``text`` being the next piece of it."""

    @abstractmethod
    def finish(self) -> list[Event]:
        """Events of the text still held back, at the end of the output."""

    # -- The prompt side, for chat templates that do not render tools themselves.

    @classmethod
    @abstractmethod
    def system_prompt(cls, tools: list[dict[str, Any]]) -> str:
        """Instructions describing ``tools`` (OpenAI format) and the output format."""

    @classmethod
    @abstractmethod
    def render_call(cls, name: str, arguments: dict[str, Any]) -> str:
        """An earlier assistant tool call, written as this format expects the model to."""

    @classmethod
    def render_result(cls, content: str) -> str:
        """An earlier tool result, as the text of a user turn."""
        return f"<tool_response>\n{content}\n</tool_response>"


def call_from_json(
    obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")
) -> ParsedCall | None:
    """A call from ``{"name": ..., "arguments": {...}}`` (or the first of ``args_keys``
    present); None when ``obj`` is not such an object. Arguments given as a JSON string are
    accepted when they hold an object."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


_DECODER = json.JSONDecoder()


def decode_object_at(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON value starting at ``text[pos]`` and the index after it; None while it is
    incomplete or invalid (the caller decides at the end of the output which it was)."""
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None


def held_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolStream:
    """A parser plus the rules every format shares: the content is the text around the
    calls, less its trailing whitespace when the output made a call (whitespace is held
    until text follows it, so a stream never sends the newline before a call); calls past
    ``max_calls`` are dropped. Streaming and non-streaming responses both go through it,
    so they agree."""

    parser: ToolParser
    max_calls: int | None = None
    calls: list[ParsedCall] = field(default_factory=list)
    _held: str = ""  # whitespace-only text, waiting to see what comes next
    _done: bool = False

    def feed(self, text: str, final: bool = False) -> list[Event]:
        """Events of the next piece of output; ``final``: it is the last piece."""
        if self._done:
            return []
        raw = self.parser.feed(text) if text else []
        if final:
            raw += self.parser.finish()
            self._done = True
        out: list[Event] = []
        for ev in raw:
            if isinstance(ev, ParsedCall):
                if self.max_calls is None or len(self.calls) < self.max_calls:
                    self.calls.append(ev)
                    out.append(ev)
            else:
                # NOTE: trailing whitespace is always held, so the result does not depend
                # on where the text was split.
                body = ev.rstrip()
                if body:
                    out.append(self._held + body)
                    self._held = ev[len(body) :]
                else:
                    self._held += ev
        if final and self._held and not self.calls:
            out.append(self._held)
        if final:
            self._held = ""
        return _merge_text(out)


def _merge_text(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, str) and out and isinstance(out[-1], str):
            out[-1] += ev
        elif ev != "":
            out.append(ev)
    return out


def extract(stream: ToolStream, text: str) -> tuple[str, list[ParsedCall]]:
    """(content, calls) of a whole output."""
    events = stream.feed(text, final=True)
    content = "".join(e for e in events if isinstance(e, str))
    return content, [e for e in events if isinstance(e, ParsedCall)]
