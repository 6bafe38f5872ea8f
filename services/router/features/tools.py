"""The tools of a request in the OpenAI and Anthropic APIs: ``tools`` and ``tool_choice``
read and checked (400 on bad input) into one ToolSetup, which says how the output is parsed.

With tool_choice "auto" the configured parser (``--tool-call-parser``) finds the calls in the
text. With "required" or a named function the output is constrained by a JSON schema
(structured outputs), as vLLM does: a JSON array of ``{"name", "parameters"}``, or the named
function's arguments object. Their place in the prompt: tool_prompt.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from services.common.proto import worker_pb2 as pb
from services.engine.grammar import check
from services.engine.sampling_params import StructuredOutputsParams
from services.router.errors import bad_request
from services.router.features.structured import set_json_schema
from services.router.features.tool_parsers.base import ToolParser, ToolStream
from services.router.features.tool_parsers.forced import JsonArrayParser, NamedFunctionParser

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
FORCED = ("required", "function")  # the choices whose output a JSON schema constrains


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
    # NOTE: a set, not list.count per name: a 4 MiB body holds ~84,000 tools.
    seen: set[str] = set()
    for t in tools:
        name = t["function"]["name"]
        if name in seen:
            raise bad_request(f"tool names must be unique; {name!r} is repeated", param=param)
        seen.add(name)


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
    given = choice.get("type") if isinstance(choice, dict) else None
    if not isinstance(given, str) or given not in kinds:  # NOTE: a list or object is no key
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
