"""Anthropic Messages API: POST /v1/messages (streaming and not) and
/v1/messages/count_tokens. A Messages request is translated here (400s in Anthropic's
format) into the same request as a chat completion (template messages, images, tools,
sampling parameters) and runs through the same serving pipeline; anthropic_output.py writes
the response."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.engine.sampling_params import SamplingParams
from services.router.api.anthropic_output import AnthropicOutput
from services.router.api.protocol.anthropic import (
    CountTokensRequest,
    MessagesRequest,
    MessagesSampling,
    MessagesTarget,
)
from services.router.api.protocol.body import read_json_object
from services.router.api.protocol.common import model_name, parse
from services.router.auth import key_tiers
from services.router.errors import APIError, bad_request
from services.router.features.images import MEDIA_TYPES, decode_base64
from services.router.features.structured import may_compile, structured_from_anthropic
from services.router.features.tool_prompt import split_tool_blocks
from services.router.features.tools import ToolSetup, anthropic_tools
from services.router.prompt import chat_prompt, check_context
from services.router.serving import ServeRequest, serve
from services.router.tiers import anthropic_tier

if TYPE_CHECKING:
    from services.router.gateway import Gateway


def _content_of(
    content: Any, where: str, images: list[str | bytes] | None
) -> str | list[dict[str, Any]]:
    """Text of a string or a list of text blocks; with ``images`` (user and assistant turns,
    tool results) also ``image`` blocks, whose sources are appended to ``images`` and which
    make the content a list of template parts. Other block types are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or an array of content blocks")
    parts: list[dict[str, Any]] = []
    for b in content:
        if not isinstance(b, dict):
            raise bad_request(f"{where}: content blocks must be objects")
        if b.get("type") == "text" and isinstance(b.get("text"), str):
            if not b["text"].strip():  # Anthropic's 400s
                blank = "be non-empty" if not b["text"] else "contain non-whitespace text"
                raise bad_request(f"{where.split('.')[0]}: text content blocks must {blank}")
            parts.append({"type": "text", "text": b["text"]})
        elif b.get("type") in ("thinking", "redacted_thinking") and images is not None:
            continue  # earlier reasoning, sent back by clients: templates drop it anyway
        elif b.get("type") == "image" and images is not None:
            images.append(_image_source(b.get("source"), where))
            parts.append({"type": "image"})
        else:
            allowed = "'text' or 'image'" if images is not None else "'text'"
            raise bad_request(f"{where}: content blocks must be {allowed}")
    if any(p["type"] == "image" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


def _image_source(source: Any, where: str) -> str | bytes:
    """Bytes of a ``base64`` image source, or the URL of a ``url`` one."""
    if not isinstance(source, dict):
        raise bad_request(f"{where}: an image block needs a 'source' object")
    if source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(data, str) or not isinstance(media, str):
            raise bad_request(f"{where}: a base64 image source needs 'media_type' and 'data'")
        if media.lower() not in MEDIA_TYPES:
            raise bad_request(
                f"{where}: unsupported image media_type {media!r}; supported: "
                f"{', '.join(sorted(MEDIA_TYPES))}"
            )
        return decode_base64(data, where)
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise bad_request(f"{where}: image source type must be 'base64' or 'url'")


def parse_messages(system: Any, msgs: list[Any]) -> tuple[list[dict[str, Any]], list[str | bytes]]:
    """Messages for the chat template (the ``system`` prompt first, if any) and the sources
    of their images, in order."""
    out: list[dict[str, Any]] = []
    images: list[str | bytes] = []
    if system is not None:
        out.append({"role": "system", "content": _content_of(system, "system", None)})
    called: set[str] = set()  # ids of the tool_use blocks of the previous turn
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_request(f"messages.{i}.role must be 'user' or 'assistant'")
        where = f"messages.{i}.content"
        if m.get("content") in ("", []) and not (m["role"] == "assistant" and i == len(msgs) - 1):
            raise bad_request(f"messages.{i}: all messages must have non-empty content except "
                              "for the optional final assistant message")  # fmt: skip
        # NOTE: a tool_result's images go to ``images`` before the turn's own: the results
        # come first in the prompt
        rest, calls, results = split_tool_blocks(m.get("content"), m["role"], where,
                                                 lambda c, w: _content_of(c, w, images))  # fmt: skip
        _check_answers(results, called, where)
        called = {c["id"] for c in calls}
        out += results  # NOTE: tool results come first in a user turn, as the API requires
        content = _content_of(rest, where, images)
        if calls:
            out.append({"role": "assistant", "content": content, "tool_calls": calls})
        elif content or not results:
            out.append({"role": m["role"], "content": content})
    return out, images


def _check_answers(results: list[dict[str, Any]], called: set[str], where: str) -> None:
    """A 400 (Anthropic's words) for a tool_result that answers no tool_use of the turn
    before: the API refuses it, and the prompt would hold an answer to no call."""
    stray = [r["tool_call_id"] for r in results if r["tool_call_id"] not in called]
    if stray:
        raise bad_request(
            f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
            f"{', '.join(stray)}. Each `tool_result` block must have a corresponding "
            "`tool_use` block in the previous message.",
            param="messages",
        )


def sampling_from_anthropic(
    body: dict[str, Any], max_tokens_limit: int | None = None
) -> SamplingParams:
    """SamplingParams from a Messages request's fields; 400 on bad values."""
    fields = parse(MessagesSampling, body, max_tokens_limit=max_tokens_limit)
    return fields.sampling_params(structured_from_anthropic(body))


def _read(gw: Gateway, body: dict[str, Any]) -> tuple[MessagesRequest, SamplingParams, ToolSetup]:
    """The typed request, its sampling parameters and tools, their grammars compiled."""
    typed = parse(MessagesRequest, body, max_tokens_limit=gw.cfg.max_tokens_limit)
    params = typed.sampling_params(structured_from_anthropic(body))
    tool_setup = anthropic_tools(body)
    if tool_setup.schema is not None and params.structured_outputs is not None:
        raise bad_request("tool_choice 'any' or 'tool' cannot be combined with an output "
                          "format", param="tool_choice")  # fmt: skip
    return typed, params, tool_setup


async def count_tokens(gw: Gateway, request: Request) -> Response:
    """POST /v1/messages/count_tokens: ``{"input_tokens": N}``, the prompt length /v1/messages
    would have for the same body (no ``max_tokens`` needed, no context-length check)."""
    try:
        body = await read_json_object(request, gw.cfg.max_body_bytes)
        model = gw.resolve_model(model_name(body), serving=False)[0]
        tok = await gw.tokenizer(model)
        typed = parse(CountTokensRequest, body)
        tool_setup = await gw.offload.run(None if may_compile(body) else 0, anthropic_tools, body)
        prompt, _ = await chat_prompt(gw, tok, *parse_messages(typed.system, typed.messages),
                                   tool_setup)  # fmt: skip
    except APIError as err:
        gw.metrics.count_request("count_tokens", err.status)
        return err.anthropic_response()
    gw.metrics.count_request("count_tokens", 200)
    return JSONResponse({"input_tokens": len(prompt)})


async def handle(gw: Gateway, request: Request) -> Response:
    """POST /v1/messages; every error comes back in Anthropic's format."""
    started = time.monotonic()
    try:
        body = await read_json_object(request, gw.cfg.max_body_bytes)
        model, max_len = await gw.resolve_awake(parse(MessagesTarget, body).model)
        tok = await gw.tokenizer(model)
        # NOTE: a constraint's grammar compiles while the body is read: off the loop.
        typed, params, tool_setup = await gw.offload.run(
            None if may_compile(body) else 0, _read, gw, body
        )
        tier = anthropic_tier(typed.service_tier, key_tiers(request))
        params = replace(params, service_tier=tier)
        messages, sources = parse_messages(typed.system, typed.messages)
        prompt, images = await chat_prompt(gw, tok, messages, sources, tool_setup)
        check_context(len(prompt), params.max_tokens, max_len)
    except APIError as err:
        gw.metrics.count_request("messages", err.status)
        return err.anthropic_response()
    mid = "msg_" + uuid.uuid4().hex
    req = ServeRequest.create(gw, "messages", mid, model, [prompt], images, params, tool_setup,
                              started)  # fmt: skip
    return await serve(gw, request, req, AnthropicOutput(req), typed.stream)
