"""A Responses request read into the chat completion it runs as (vLLM's serving_responses does
the same): ``input`` items become chat turns (earlier function calls as assistant tool calls,
their outputs as tool turns), tools and ``text.format`` take their chat form. Every 400 names
the Responses field at fault."""

from __future__ import annotations

import uuid
from typing import Any

from services.router.api.protocol.responses import ResponsesRequest
from services.router.errors import bad_request, empty_array

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_ITEM_IDS = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
             "reasoning": "rs"}  # fmt: skip
# vLLM's sampling extensions a Responses request may carry too (as vLLM's own does), and the
# service tier (OpenAI's field, as on chat); they are checked as the chat fields of the same
# names.
EXTRA_SAMPLING = (
    "top_k", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens", "ignore_eos", "logit_bias", "skip_special_tokens",
    "service_tier", "priority",
)  # fmt: skip


def _parts(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A turn's content: a string, or text and image parts in the chat format."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array", param="input")
    if not content:  # as chat's content (api/openai.py chat_messages)
        raise empty_array(f"{where}.content")
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text") and isinstance(p.get("text"), str):
            parts.append({"type": "text", "text": p["text"]})
        elif kind == "input_image":
            url = p.get("image_url")
            if not isinstance(url, str) or not url:
                raise bad_request(f"{where}.content[{j}] needs an 'image_url' string "
                                  "(file_id is not supported)", param="input")  # fmt: skip
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise bad_request(f"{where}.content[{j}] must be an 'input_text', 'output_text' or "
                              "'input_image' part", param="input")  # fmt: skip
    return parts


def _call_id(item: dict[str, Any], where: str) -> str:
    cid = item.get("call_id")
    if not isinstance(cid, str) or not cid:
        raise bad_request(f"{where} needs a 'call_id' string", param="input")
    return cid


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    name, args = item.get("name"), item.get("arguments")
    if not isinstance(name, str) or not isinstance(args, str):
        raise bad_request(f"{where} needs 'name' and 'arguments' strings", param="input")
    return {"id": _call_id(item, where), "type": "function",
            "function": {"name": name, "arguments": args}}  # fmt: skip


def _check_id(item_id: Any, where: str, seen: set[str]) -> None:
    """An item's ``id`` (optional) is a string no earlier item has (OpenAI's 400): ids page
    GET /v1/responses/{id}/input_items, where a repeated one sends a client's ``after``
    back to its first use, round the same items for ever."""
    if item_id is None:
        return
    if not isinstance(item_id, str) or not item_id:
        raise bad_request(f"{where}.id must be a non-empty string", param="input")
    if item_id in seen:
        raise bad_request(f"Duplicate item found with id {item_id}. Remove duplicate items "
                          "from your input and try again.", param="input")  # fmt: skip
    seen.add(item_id)


def input_messages(value: str | list[Any]) -> list[dict[str, Any]]:
    """Chat turns of ``input``; consecutive function calls form one assistant turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out: list[dict[str, Any]] = []
    ids: set[str] = set()
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", param="input")
        _check_id(item.get("id"), where, ids)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            role = _ROLES.get(role) if isinstance(role, str) else None
            if role is None:
                raise bad_request(f"{where}.role must be 'user', 'assistant', 'system' or "
                                  "'developer'", param="input")  # fmt: skip
            out.append({"role": role, "content": _parts(item.get("content"), where)})
        elif kind == "function_call":
            call = _function_call(item, where)
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                raise bad_request(f"{where}.output must be a string", param="input")
            out.append({"role": "tool", "tool_call_id": _call_id(item, where), "content": output})
        elif kind != "reasoning":  # earlier reasoning: templates leave it out anyway
            raise bad_request(f"{where}.type must be 'message', 'function_call', "
                              "'function_call_output' or 'reasoning'", param="input")  # fmt: skip
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """Function tools in the chat format (checked there too: names, schemas)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request("'tools' must be an array", param="tools")
    out = []
    for i, t in enumerate(value):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise bad_request(f"tools[{i}] must be a function tool ({{'type': 'function', "
                              "'name': ...}); built-in tools are not supported", param="tools")  # fmt: skip
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(value: Any) -> Any:
    """``{"type": "function", "name": ...}`` in the chat format; strings as they are."""
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    if value is None or isinstance(value, str):
        return value
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or "
                      "{'type': 'function', 'name': ...}", param="tool_choice")  # fmt: skip


def _response_format(text: Any) -> dict[str, Any] | None:
    """``text.format`` as the chat ``response_format``."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or (fmt is not None and not isinstance(fmt, dict)):
        raise bad_request("'text' must be an object {'format': {...}}", param="text")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request("text.format.schema must be a JSON Schema object", param="text")
        return {"type": "json_schema",
                "json_schema": {"name": fmt.get("name") or "output", "schema": fmt["schema"]}}  # fmt: skip
    raise bad_request("text.format.type must be 'text', 'json_object' or 'json_schema'",
                      param="text")  # fmt: skip


def chat_body(
    typed: ResponsesRequest, body: dict[str, Any], history: list[dict[str, Any]]
) -> dict[str, Any]:
    """The chat completion body ``typed`` (read from ``body``) runs as; ``history``: the turns
    of the ``previous_response_id`` chain (its instructions are not carried over, as
    OpenAI's)."""
    system = [{"role": "system", "content": typed.instructions}] if typed.instructions else []
    chat: dict[str, Any] = {
        "model": typed.model,
        "messages": check_call_outputs(system + history + input_messages(typed.input)),
        "temperature": typed.temperature,
        "top_p": typed.top_p,
        "parallel_tool_calls": typed.parallel_tool_calls,
    }
    optional = {
        "max_completion_tokens": typed.max_output_tokens,
        "tools": _tools(typed.tools),
        "tool_choice": _tool_choice(typed.tool_choice),
        "response_format": _response_format(typed.text),
    }
    if typed.logprobs:
        optional.update(logprobs=True, top_logprobs=typed.top_logprobs or 0)
    optional.update({k: body.get(k) for k in EXTRA_SAMPLING})
    chat.update({k: v for k, v in optional.items() if v is not None})
    return chat


def check_call_outputs(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages``, or OpenAI's 400 for a function_call_output whose call is in neither the
    input nor the previous_response_id chain before it (the prompt would hold an answer to no
    call)."""
    known: set[str] = set()
    for m in messages:
        known.update(c["id"] for c in m.get("tool_calls") or () if "id" in c)
        if m["role"] == "tool" and m["tool_call_id"] not in known:
            raise bad_request("No tool call found for function call output with call_id "
                              f"{m['tool_call_id']}.", param="input")  # fmt: skip
    return messages


def input_items(value: str | list[Any]) -> list[dict[str, Any]]:
    """``input`` (already checked) as the items GET /v1/responses/{id}/input_items lists: each
    with an id, a message's content as parts."""
    items = [{"role": "user", "content": value}] if isinstance(value, str) else value
    out = []
    for item in items:
        kind = item.get("type", "message")
        new = {**item, "type": kind, "id": item.get("id") or f"{_ITEM_IDS.get(kind, 'item')}_"
               + uuid.uuid4().hex}  # fmt: skip
        if kind == "message":
            content = item["content"]
            if isinstance(content, str):
                content = [{"type": "input_text", "text": content}]
            new.update(content=content, status="completed")
        out.append(new)
    return out


def assistant_turn(text: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat turn of a response's output (``calls``: its function_call items), stored for
    a later ``previous_response_id``."""
    turn: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        turn["tool_calls"] = [{"id": c["call_id"], "type": "function",
                               "function": {"name": c["name"], "arguments": c["arguments"]}}
                              for c in calls]  # fmt: skip
    return turn


def echo_fields(typed: ResponsesRequest) -> dict[str, Any]:
    """The request's settings a response object repeats."""
    metadata = typed.metadata if isinstance(typed.metadata, dict) else {}
    tool_choice = typed.tool_choice if typed.tool_choice is not None else "auto"
    return {
        "background": typed.background,
        "instructions": typed.instructions,
        "max_output_tokens": typed.max_output_tokens,
        "parallel_tool_calls": typed.parallel_tool_calls,
        "previous_response_id": typed.previous_response_id,
        "reasoning": typed.reasoning if isinstance(typed.reasoning, dict) else None,
        "store": typed.store,
        "temperature": typed.temperature,
        "text": typed.text if isinstance(typed.text, dict) else {"format": {"type": "text"}},
        "tool_choice": tool_choice,
        "tools": typed.tools or [],
        "top_p": typed.top_p,
        "truncation": "disabled",
        "metadata": {str(k): str(v) for k, v in metadata.items()},
    }


def checked_metadata(value: Any) -> None:
    """``metadata``: at most 16 string pairs (OpenAI's bound)."""
    if value is None:
        return
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(isinstance(v, str) for v in value.values())
    ):
        raise bad_request("'metadata' must be an object of at most 16 string values",
                          param="metadata")  # fmt: skip
