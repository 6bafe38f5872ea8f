"""Parsers of outputs constrained to tool calls by a JSON schema (``tool_choice`` "required"
or a named function), as vLLM does it: "required" makes the model write a JSON array
``[{"name": ..., "parameters": {...}}, ...]``; a named function makes it write the arguments
object alone. No markers; an output that is not such JSON (cut by max_tokens) is content."""

from __future__ import annotations

from typing import Any

from services.router.features.tool_parsers.base import (
    Event,
    ParsedCall,
    ToolParser,
    call_from_json,
    decode_object_at,
)


class _NoPrompt(ToolParser):
    """The prompt side comes from the configured format's parser, not from these."""

    @classmethod
    def system_prompt(cls, tools: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    @classmethod
    def render_call(cls, name: str, arguments: dict[str, Any]) -> str:
        raise NotImplementedError


class JsonArrayParser(_NoPrompt):
    """``[{"name": ..., "parameters": {...}}, ...]``; each call is emitted once complete."""

    name = "json_array"

    def __init__(self) -> None:
        self._buf = ""
        self._pos = 0  # next index of _buf to read
        self._state = "open"  # open ([) | item ({ or ]) | sep (, or ]) | done | bad
        self._made_call = False

    def _skip_ws(self) -> None:
        while self._pos < len(self._buf) and self._buf[self._pos].isspace():
            self._pos += 1

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        while self._state not in ("done", "bad"):
            self._skip_ws()
            if self._pos == len(self._buf):
                break
            c = self._buf[self._pos]
            if c == "]" and self._state in ("item", "sep"):
                self._state, self._pos = "done", self._pos + 1
            elif self._state in ("open", "sep"):
                if c != ("[" if self._state == "open" else ","):
                    self._state = "bad"
                    break
                self._state, self._pos = "item", self._pos + 1
            else:
                got = decode_object_at(self._buf, self._pos)
                if got is None:
                    break
                call = call_from_json(got[0], ("parameters", "arguments"))
                if call is None:
                    self._state = "bad"
                    break
                out.append(call)
                self._made_call = True
                self._state, self._pos = "sep", got[1]
        if self._state == "done":
            out.append(self._buf[self._pos :])  # after the array: content
            self._pos = len(self._buf)
        return out

    def finish(self) -> list[Event]:
        if self._state == "done":
            return []
        # Invalid or cut short: what was not made into calls is content (all of it when no
        # call was made, as the text was held back).
        start = self._pos if self._made_call else 0
        rest, self._buf, self._state = self._buf[start:], "", "done"
        return [rest]


class NamedFunctionParser(_NoPrompt):
    """The output is the arguments object of the function ``fn``."""

    name = "named_function"

    def __init__(self, fn: str) -> None:
        self.fn = fn
        self._buf = ""
        self._done = False

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        if self._done:
            out, self._buf = self._buf, ""
            return [out]
        pos = len(self._buf) - len(self._buf.lstrip())
        if pos == len(self._buf):
            return []
        got = decode_object_at(self._buf, pos)
        if got is None or not isinstance(got[0], dict):
            return []
        call = call_from_json({"name": self.fn, "arguments": got[0]})
        assert call is not None
        self._done = True
        rest, self._buf = self._buf[got[1] :], ""
        return [call, rest]

    def finish(self) -> list[Event]:
        out, self._buf = self._buf, ""
        return [out]


__all__ = ["JsonArrayParser", "NamedFunctionParser", "ParsedCall"]
