"""Hermes-style tool calls (Hermes 2/3, Qwen2.5/Qwen3, SmolLM3):
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number of them,
with content before, between or after."""

from __future__ import annotations

import json
from typing import Any

from services.router.features.tool_parsers.base import (
    Event,
    ToolParser,
    call_from_json,
    held_suffix,
)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def __init__(self) -> None:
        self._buf = ""  # text not yet decided
        self._in_call = False  # inside <tool_call> ... </tool_call>

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        while True:
            if not self._in_call:
                i = self._buf.find(START)
                if i < 0:
                    keep = held_suffix(self._buf, START)
                    out.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return out
                out.append(self._buf[:i])
                self._buf = self._buf[i + len(START) :]
                self._in_call = True
            else:
                j = self._buf.find(END)
                if j < 0:
                    return out
                body, self._buf = self._buf[:j], self._buf[j + len(END) :]
                self._in_call = False
                out.append(_parse(body) or START + body + END)

    def finish(self) -> list[Event]:
        rest, self._buf = self._buf, ""
        if not self._in_call:
            return [rest]
        # The output ended inside a call (no closing tag): a complete object still counts.
        self._in_call = False
        return [_parse(rest) or START + rest]

    @classmethod
    def system_prompt(cls, tools: list[dict[str, Any]]) -> str:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    @classmethod
    def render_call(cls, name: str, arguments: dict[str, Any]) -> str:
        call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        return f"{START}\n{call}\n{END}"


def _parse(body: str) -> Event | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    return call_from_json(obj)
