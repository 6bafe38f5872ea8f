"""Tools in the prompt: earlier tool calls and results of both APIs as chat-template
messages, and the tools themselves for the template.

Tools, assistant tool calls and tool results reach the chat template in the Hugging Face
format (``tools=[...]``, ``{"role": "assistant", "tool_calls": [...]}``, ``{"role": "tool",
...}``). A template that does not use ``tools`` gets them as text instead: a system prompt
from the output parser (Hermes-style for ``hermes``) and the earlier calls and results
written as that parser's format expects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from services.router.errors import bad_request, empty_array
from services.router.features.tool_parsers.base import ToolParser
from services.router.features.tools import ToolSetup


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    """Arguments of an earlier call as a dict (what chat templates expect)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            raise bad_request(f"{where} is not valid JSON", param="messages") from None
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be a JSON object", param="messages")
    return raw


def openai_tool_calls(m: dict[str, Any], i: int) -> list[dict[str, Any]]:
    """The ``tool_calls`` of an OpenAI assistant message, in the template's format."""
    raw = m.get("tool_calls")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request(f"messages[{i}].tool_calls must be an array", param="messages")
    if not raw:  # OpenAI's schema: minItems 1
        raise empty_array(f"messages[{i}].tool_calls")
    out = []
    for j, c in enumerate(raw):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{where} needs a 'function' with a 'name'", param="messages")
        call: dict[str, Any] = {"type": "function", "function": {
            "name": fn["name"], "arguments": _arguments(fn.get("arguments"), f"{where}.function.arguments"),
        }}  # fmt: skip
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def anthropic_tool_use(block: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``tool_use`` block of an assistant turn, as a template tool call."""
    if not isinstance(block.get("name"), str) or not isinstance(block.get("id"), str):
        raise bad_request(f"{where}: a tool_use block needs 'id' and 'name'", param="messages")
    return {"id": block["id"], "type": "function", "function": {
        "name": block["name"], "arguments": _arguments(block.get("input", {}), f"{where}.input"),
    }}  # fmt: skip


def anthropic_tool_result(
    block: dict[str, Any], where: str, content_of: Callable[[Any, str], Any]
) -> dict[str, Any]:
    """A ``tool_result`` block of a user turn, as a template ``tool`` message; ``content_of``
    reads its content (text, or template parts when it holds images)."""
    if not isinstance(block.get("tool_use_id"), str):
        raise bad_request(f"{where}: a tool_result block needs 'tool_use_id'", param="messages")
    content = content_of(block.get("content", ""), f"{where}.content")
    if block.get("is_error"):
        if isinstance(content, str):
            content = f"Error: {content}"
        else:
            content = [{"type": "text", "text": "Error: "}, *content]
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}


def template_uses_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders ``tools`` itself."""
    template = getattr(getattr(tokenizer, "hf", None), "chat_template", None)
    if isinstance(template, dict):
        return "tool_use" in template or any("tools" in str(t) for t in template.values())
    return isinstance(template, str) and "tools" in template


def prepare(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    setup: ToolSetup | None,
    parser: type[ToolParser],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for the chat template: as they are when the template renders
    tools, else with tools, calls and results written as text in ``parser``'s format."""
    tools = setup.tools if setup is not None and setup.render else None
    has_history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if template_uses_tools(tokenizer) or not (tools or has_history):
        return messages, tools
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = [m["content"]] if isinstance(m["content"], str) and m["content"] else []
            text += [parser.render_call(c["function"]["name"], c["function"]["arguments"])
                     for c in m["tool_calls"]]  # fmt: skip
            out.append({"role": "assistant", "content": "\n".join(text)})
        elif m["role"] == "tool":
            # NOTE: a result's images (a tool that returned one) follow its text
            parts = [{"type": "text", "text": parser.render_result(_text(m["content"]))},
                     *_images(m["content"])]  # fmt: skip
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += [{"type": "text", "text": "\n"}, *parts]
            else:
                out.append({"role": "user", "content": parts, "tool_results": True})
        else:
            out.append(m)
    out = [_results_turn(m) if m.get("tool_results") else m for m in out]
    if tools:
        prompt = parser.system_prompt(tools)
        if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _images(content: Any) -> list[dict[str, Any]]:
    """The image parts of a message's content."""
    if not isinstance(content, list):
        return []
    return [p for p in content if isinstance(p, dict) and p.get("type") == "image"]


def _results_turn(m: dict[str, Any]) -> dict[str, Any]:
    """The user turn of a run of tool results: its parts, or their text without images."""
    parts = m["content"]
    return {"role": "user", "content": parts if _images(parts) else _text(parts)}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def split_tool_blocks(
    content: Any, role: str, where: str, content_of: Callable[[Any, str], Any]
) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """An Anthropic turn's content without its tool blocks; the template tool calls of its
    ``tool_use`` blocks (assistant); the ``tool`` messages of its ``tool_result`` blocks
    (user), whose content ``content_of`` reads."""
    if not isinstance(content, list):
        return content, [], []
    rest: list[Any] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "tool_use" and role == "assistant":
            calls.append(anthropic_tool_use(b, f"{where}.{j}"))
        elif kind == "tool_result" and role == "user":
            results.append(anthropic_tool_result(b, f"{where}.{j}", content_of))
        elif kind in ("tool_use", "tool_result"):
            raise bad_request(f"{where}.{j}: a {kind} block cannot be in a {role} turn",
                              param="messages")  # fmt: skip
        else:
            rest.append(b)
    return rest if rest or not (calls or results) else "", calls, results
