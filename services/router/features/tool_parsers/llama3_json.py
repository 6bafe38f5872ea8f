"""Llama 3.x JSON tool calls: the output starts (after an optional ``<|python_tag|>``) with
``{"name": ..., "parameters": {...}}``, further calls separated by ``;``. Output that does
not start with ``{`` is plain content."""

from __future__ import annotations

import json
from typing import Any

from services.router.features.tool_parsers.base import (
    Event,
    ToolParser,
    call_from_json,
    decode_object_at,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def __init__(self) -> None:
        self._buf = ""
        self._mode = "start"  # start (undecided) | json | text
        self._made_call = False

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        if self._mode == "start":
            s = self._buf.lstrip()
            if not s or (PYTHON_TAG.startswith(s) and s != PYTHON_TAG):
                return []  # still undecided
            if s.startswith(PYTHON_TAG):
                s = s[len(PYTHON_TAG) :].lstrip()
                if not s:
                    return []
            if s[0] != "{":
                self._mode = "text"
            else:
                self._mode = "json"
        if self._mode == "text":
            out, self._buf = self._buf, ""
            return [out]
        return self._scan()

    def _scan(self) -> list[Event]:
        out: list[Event] = []
        while True:
            pos = len(self._buf) - len(self._buf.lstrip())
            if self._made_call:
                if pos < len(self._buf) and self._buf[pos] == ";":
                    pos += 1
                    pos += len(self._buf[pos:]) - len(self._buf[pos:].lstrip())
                if pos == len(self._buf):
                    return out  # only separators so far
                if self._buf[pos] != "{":
                    return out + self._to_text()
            elif self._buf[pos:].startswith(PYTHON_TAG):
                pos += len(PYTHON_TAG)
                pos += len(self._buf[pos:]) - len(self._buf[pos:].lstrip())
            got = decode_object_at(self._buf, pos)
            if got is None:
                return out  # incomplete (or invalid: decided by finish)
            obj, end = got
            call = call_from_json(obj, ("parameters", "arguments"))
            if call is None:
                return out + self._to_text()
            out.append(call)
            self._made_call = True
            self._buf = self._buf[end:]

    def _to_text(self) -> list[Event]:
        self._mode = "text"
        out, self._buf = self._buf, ""
        return [out]

    def finish(self) -> list[Event]:
        out, self._buf = self._buf, ""
        return [out]

    @classmethod
    def system_prompt(cls, tools: list[dict[str, Any]]) -> str:
        listing = "\n\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "You have access to the following functions. To call a function, respond only "
            'with a JSON object of the form {"name": function name, "parameters": dictionary '
            "of argument name and its value}. Do not use variables.\n\n" + listing
        )

    @classmethod
    def render_call(cls, name: str, arguments: dict[str, Any]) -> str:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
