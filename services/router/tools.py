"""Tool calling in the OpenAI and Anthropic APIs: the request's tools and tool_choice
(checked, 400 on bad input), their place in the prompt, and the parser of the output.

The prompt: tools, assistant tool calls and tool results reach the chat template in the
Hugging Face format (``tools=[...]``, ``{"role": "assistant", "tool_calls": [...]}``,
``{"role": "tool", ...}``). A template that does not use ``tools`` gets them as text
instead: a system prompt from the output parser (Hermes-style for ``hermes``) and the earlier
calls and results written as that parser's format expects.

The output: with tool_choice "auto" the configured parser (``--tool-call-parser``) finds the
calls in the text. With "required" or a named function the output is constrained by a JSON
schema (structured outputs), as vLLM does: a JSON array of ``{"name", "parameters"}``, or
the named function's arguments object.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from services.common.proto import worker_pb2 as pb
from services.engine.sampling_params import StructuredOutputsParams
from services.engine.structured_output import check
from services.router.errors import APIError, bad_request
from services.router.structured import set_json_schema
from services.router.tool_parsers.base import ParsedCall, ToolParser, ToolStream
from services.router.tool_parsers.forced import JsonArrayParser, NamedFunctionParser

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True)
class ToolSetup:
    """The tools of one request and how the model may use them."""

    tools: list[dict[str, Any]]  # OpenAI format: {"type": "function", "function": {...}}
    choice: str  # "none" | "auto" | "required" | "function"
    function: str | None = None  # the function of choice "function"
    parallel: bool = True  # more than one call allowed

    @property
    def render(self) -> bool:
        """The tools go into the prompt (not with "none": the model is not to call them)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the output is constrained to; None: unconstrained."""
        if self.choice == "function":
            return _parameters(self._tool(self.function))
        if self.choice != "required":
            return None
        items = [
            {
                "properties": {
                    "name": {"type": "string", "enum": [t["function"]["name"]]},
                    "parameters": _parameters(t),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,  # else a sampler may add keys forever
            }
            for t in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": {"type": "object", "anyOf": items}}  # fmt: skip
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def _tool(self, name: str | None) -> dict[str, Any]:
        return next(t for t in self.tools if t["function"]["name"] == name)

    def constrain(self, params: pb.SamplingParams) -> None:
        """Set the schema of "required" / a named function on ``params``."""
        schema = self.schema
        if schema is not None:
            set_json_schema(params, schema)

    def checked(self) -> ToolSetup:
        """This setup, once its constraint compiles (a 400 naming ``tools`` if a tool's
        schema uses what the grammar compiler cannot follow); before any worker sees it."""
        schema = self.schema
        if schema is not None:
            try:
                check(StructuredOutputsParams(json=schema))
            except ValueError as exc:
                raise bad_request(f"the tools' schemas cannot constrain the output: {exc}",
                                  param="tools") from None  # fmt: skip
        return self

    def stream(self, parser: type[ToolParser]) -> ToolStream | None:
        """A parser for one choice's output; None: the output is plain content."""
        if self.choice == "none" or not self.tools:
            return None
        max_calls = None if self.parallel else 1
        if self.choice == "function":
            assert self.function is not None
            return ToolStream(NamedFunctionParser(self.function), max_calls)
        if self.choice == "required":
            return ToolStream(JsonArrayParser(), max_calls)
        return ToolStream(parser(), max_calls)


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


# -- Request validation ---------------------------------------------------------------------


def _check_name(name: Any, where: str, param: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request(
            f"{where} must be a string of 1 to 128 letters, digits, '_', '-', '.' or ':'",
            param=param,
        )
    return name


def _check_schema(schema: Any, where: str, param: str) -> dict[str, Any]:
    if schema is None:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise bad_request(f"{where} must be a JSON Schema object", param=param)
    if schema.get("type", "object") != "object":
        raise bad_request(f"{where} must describe an object ('type': 'object')", param=param)
    try:
        json.dumps(schema)
    except (TypeError, ValueError):
        raise bad_request(f"{where} is not valid JSON", param=param) from None
    return schema


def _unique(tools: list[dict[str, Any]], param: str) -> None:
    names = [t["function"]["name"] for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise bad_request(f"tool names must be unique; {dup!r} is repeated", param=param)


def openai_tools(body: dict[str, Any]) -> ToolSetup:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request."""
    raw = body.get("tools")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise bad_request("'tools' must be an array", param="tools")
    tools = []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad_request(f"{where} must be an object with 'type': 'function'", param="tools")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{where}.function must be an object", param="tools")
        name = _check_name(fn.get("name"), f"{where}.function.name", "tools")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise bad_request(f"{where}.function.description must be a string", param="tools")
        params = _check_schema(fn.get("parameters"), f"{where}.function.parameters", "tools")
        out: dict[str, Any] = {"name": name}
        if desc is not None:
            out["description"] = desc
        out["parameters"] = params
        tools.append({"type": "function", "function": out})
    _unique(tools, "tools")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(
                "'tool_choice' must be 'none', 'auto', 'required' or "
                "{'type': 'function', 'function': {'name': ...}}",
                param="tool_choice",
            )
        if choice == "required" and not tools:
            raise bad_request("tool_choice 'required' needs 'tools'", param="tool_choice")
        return ToolSetup(tools, choice, None, parallel).checked()
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(fn, dict):
        raise bad_request(
            "'tool_choice' object must be {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    name = _named(tools, fn.get("name"), "tool_choice")
    return ToolSetup(tools, "function", name, parallel).checked()


def _named(tools: list[dict[str, Any]], name: Any, param: str) -> str:
    if not any(t["function"]["name"] == name for t in tools):
        raise bad_request(f"tool_choice names {name!r}, which is not in 'tools'", param=param)
    return str(name)


def anthropic_tools(body: dict[str, Any]) -> ToolSetup:
    """``tools`` and ``tool_choice`` of a Messages request, in the OpenAI format."""
    raw = body.get("tools")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise bad_request("tools: must be an array", param="tools")
    tools = []
    for i, t in enumerate(raw):
        where = f"tools.{i}"
        if not isinstance(t, dict) or t.get("type", "custom") != "custom":
            raise bad_request(f"{where}: only custom tools (name, input_schema) are supported",
                              param="tools")  # fmt: skip
        name = _check_name(t.get("name"), f"{where}.name", "tools")
        desc = t.get("description")
        if desc is not None and not isinstance(desc, str):
            raise bad_request(f"{where}.description: must be a string", param="tools")
        if "input_schema" not in t:
            raise bad_request(f"{where}.input_schema: field required", param="tools")
        schema = _check_schema(t["input_schema"], f"{where}.input_schema", "tools")
        fn: dict[str, Any] = {"name": name}
        if desc is not None:
            fn["description"] = desc
        fn["parameters"] = schema
        tools.append({"type": "function", "function": fn})
    _unique(tools, "tools")
    choice = body.get("tool_choice")
    if choice is None:
        return ToolSetup(tools, "auto" if tools else "none")
    kinds = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}
    if not isinstance(choice, dict) or choice.get("type") not in kinds:
        raise bad_request("tool_choice.type: must be 'auto', 'any', 'tool' or 'none'",
                          param="tool_choice")  # fmt: skip
    disable = choice.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        raise bad_request("tool_choice.disable_parallel_tool_use: must be a boolean",
                          param="tool_choice")  # fmt: skip
    kind = kinds[choice["type"]]
    if kind in ("required", "function") and not tools:
        raise bad_request(f"tool_choice.type '{choice['type']}' needs tools", param="tool_choice")
    fn_name = _named(tools, choice.get("name"), "tool_choice") if kind == "function" else None
    return ToolSetup(tools, kind, fn_name, not disable).checked()


# -- Messages -------------------------------------------------------------------------------


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


def anthropic_tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``tool_result`` block of a user turn, as a template ``tool`` message."""
    if not isinstance(block.get("tool_use_id"), str):
        raise bad_request(f"{where}: a tool_result block needs 'tool_use_id'", param="messages")
    content = block.get("content", "")
    if isinstance(content, list):
        if not all(isinstance(b, dict) and b.get("type") == "text" for b in content):
            raise bad_request(f"{where}: tool_result content blocks must be 'text'",
                              param="messages")  # fmt: skip
        content = "".join(str(b.get("text", "")) for b in content)
    elif not isinstance(content, str):
        raise bad_request(f"{where}: tool_result content must be a string or text blocks",
                          param="messages")  # fmt: skip
    if block.get("is_error"):
        content = f"Error: {content}"
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
            result = parser.render_result(_text(m["content"]))
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append(m)
    out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
    if tools:
        prompt = parser.system_prompt(tools)
        if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


# -- Responses ------------------------------------------------------------------------------


def openai_call_id() -> str:
    return "chatcmpl-tool-" + uuid.uuid4().hex


def anthropic_call_id() -> str:
    return "toolu_" + uuid.uuid4().hex


def openai_tool_call(call: ParsedCall) -> dict[str, Any]:
    """A call in a non-streaming chat.completion message."""
    return {"id": openai_call_id(), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip


def openai_call_deltas(index: int, call: ParsedCall) -> list[dict[str, Any]]:
    """The ``delta`` objects of one call in a chat.completion.chunk stream: the call's id and
    name, then its arguments (``index`` is the call's position in the message)."""
    return [
        {"tool_calls": [{"index": index, "id": openai_call_id(), "type": "function",
                         "function": {"name": call.name, "arguments": ""}}]},
        {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]},
    ]  # fmt: skip


def anthropic_input(call: ParsedCall) -> dict[str, Any]:
    """A call's arguments as the ``input`` object of a tool_use block."""
    value = json.loads(call.arguments)
    if not isinstance(value, dict):  # parsers only make objects; a bug if not
        raise APIError(500, "a parsed tool call has arguments that are not an object")
    return value


def openai_deltas(stream: ToolStream, text: str, final: bool) -> list[dict[str, Any]]:
    """The chunk ``delta`` objects of the next piece of one choice's output."""
    index = len(stream.calls)
    out: list[dict[str, Any]] = []
    for ev in stream.feed(text, final):
        if isinstance(ev, str):
            out.append({"content": ev})
        else:
            out += openai_call_deltas(index, ev)
            index += 1
    return out


def split_tool_blocks(
    content: Any, role: str, where: str
) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """An Anthropic turn's content without its tool blocks; the template tool calls of its
    ``tool_use`` blocks (assistant); the ``tool`` messages of its ``tool_result`` blocks
    (user)."""
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
            results.append(anthropic_tool_result(b, f"{where}.{j}"))
        elif kind in ("tool_use", "tool_result"):
            raise bad_request(f"{where}.{j}: a {kind} block cannot be in a {role} turn",
                              param="messages")  # fmt: skip
        else:
            rest.append(b)
    return rest if rest or not (calls or results) else "", calls, results
