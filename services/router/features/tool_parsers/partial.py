"""A forced tool call cut short by max_tokens: the call it was writing, and the part of its
arguments that was written, as Anthropic returns it (stop_reason ``max_tokens`` with an
incomplete ``tool_use`` block last, its input what the partial JSON holds).

With tool_choice ``any`` the output is a JSON array of ``{"name", "parameters"}`` (forced.py
JsonArrayParser); with ``tool`` it is the named function's arguments object. Either is valid
JSON cut at some point, since a grammar constrained every token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from services.router.features.tool_parsers.base import Event, ParsedCall

# The start of an item of the "any" array, up to its arguments: the grammar writes "name"
# first (the schema's order); a tool name has no characters that JSON escapes.
_ITEM = re.compile(r'\s*[\[,]?\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"parameters"\s*:\s*(.*)',
                   re.DOTALL)  # fmt: skip
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None}
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]  # not in typeshed


@dataclass(frozen=True)
class CutCall(ParsedCall):
    """A call whose ``arguments`` were cut short: a prefix of a JSON object."""


def cut_call(text: str, function: str | None) -> CutCall | None:
    """The call an output cut short was writing: ``function``'s (tool_choice ``tool``), or
    the one an ``any`` array's last item names; its ``arguments`` are the partial JSON text.
    None when the text is not the start of a call (nothing written yet, not JSON)."""
    if function is not None:
        args = text.strip()
        return CutCall(function, args) if args.startswith("{") or not args else None
    m = _ITEM.fullmatch(text)
    return CutCall(m.group(1), m.group(2).strip()) if m else None


def with_cut_call(events: list[Event], function: str | None) -> list[Event]:
    """The last events of a forced output cut short: its trailing text (the JSON of the call
    being written) as that call, or left out when it names none yet (``[``, ``,``)."""
    if not events or not isinstance(events[-1], str):
        return events
    call = cut_call(events[-1], function)
    return events[:-1] + ([call] if call is not None else [])


def partial_object(text: str) -> dict[str, Any]:
    """The object a JSON text cut short holds so far, as the Anthropic SDK reads streamed
    ``partial_json`` (jiter's partial mode): complete members kept, open arrays and objects
    closed, a member whose string or literal was cut left out."""
    value = _Partial(text).value()
    return value if isinstance(value, dict) else {}


class _Cut(Exception):
    """The text ended inside a value."""


class _Partial:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def _peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        if self.pos == len(self.text):
            raise _Cut
        return self.text[self.pos]

    def value(self) -> Any:
        try:
            return self._value()
        except (_Cut, ValueError):
            return None

    def _value(self) -> Any:
        c = self._peek()
        if c == "{":
            return self._container({}, "}")
        if c == "[":
            return self._container([], "]")
        if c == '"':
            try:
                s, self.pos = _scanstring(self.text, self.pos + 1)
            except json.JSONDecodeError:
                raise _Cut from None
            return s
        m = _NUMBER.match(self.text, self.pos)
        if m:  # NOTE: one at the very end is kept, as jiter keeps it
            self.pos = m.end()
            return json.loads(m.group())
        for word, v in _LITERALS.items():
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return v
        raise _Cut

    def _container(self, out: Any, close: str) -> Any:
        """An object or array; whatever was complete when the text ended."""
        self.pos += 1
        try:
            while True:
                if self._peek() == close:
                    self.pos += 1
                    return out
                if isinstance(out, dict):
                    key = self._value()
                    if not isinstance(key, str) or self._peek() != ":":
                        raise ValueError("not JSON")
                    self.pos += 1
                    out[key] = self._value()  # a container cut inside is kept
                else:
                    out.append(self._value())
                if self._peek() == ",":
                    self.pos += 1
        except _Cut:
            return out
