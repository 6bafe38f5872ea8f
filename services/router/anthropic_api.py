"""Anthropic Messages API: POST /v1/messages (streaming and not) and
/v1/messages/count_tokens."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.common.proto import worker_pb2 as pb
from services.engine.sampling_params import MAX_TOP_K, SamplingParams
from services.router.accumulate import Choice, Usage, apply_step, until_disconnect
from services.router.errors import APIError, bad_request
from services.router.images import MEDIA_TYPES, chat_prompt, decode_base64
from services.router.openai_api import check_context
from services.router.reasoning.base import ReasoningParser, extract_reasoning
from services.router.reasoning.factory import reasoning_parser_class
from services.router.streams import merge_streams
from services.router.structured import may_compile, structured_from_anthropic
from services.router.tool_parsers.base import ParsedCall, ToolStream
from services.router.tool_parsers.factory import tool_parser_class
from services.router.tools import (
    ToolSetup,
    anthropic_call_id,
    anthropic_input,
    anthropic_tools,
    prepare,
    split_tool_blocks,
)
from services.router.validation import get, get_int, get_number, get_stop, read_json_object
from services.worker.convert import params_to_proto

if TYPE_CHECKING:
    from services.router.gateway import Gateway


def _content_of(
    content: Any, where: str, images: list[str | bytes] | None
) -> str | list[dict[str, Any]]:
    """Text of a string or a list of text blocks; with ``images`` (user and assistant turns)
    also ``image`` blocks, whose sources are appended to ``images`` and which make the
    content a list of template parts. Other block types are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or an array of content blocks")
    parts: list[dict[str, Any]] = []
    for b in content:
        if not isinstance(b, dict):
            raise bad_request(f"{where}: content blocks must be objects")
        if b.get("type") == "text" and isinstance(b.get("text"), str):
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


def parse_messages(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str | bytes]]:
    """Messages for the chat template and the sources of their images, in order."""
    msgs = get(body, "messages", list, required=True)
    if not msgs:
        raise bad_request("messages: at least one message is required")
    out: list[dict[str, Any]] = []
    images: list[str | bytes] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _content_of(system, "system", None)})
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_request(f"messages.{i}.role must be 'user' or 'assistant'")
        where = f"messages.{i}.content"
        rest, calls, results = split_tool_blocks(m.get("content"), m["role"], where)
        out += results  # NOTE: tool results come first in a user turn, as the API requires
        content = _content_of(rest, where, images)
        if calls:
            out.append({"role": "assistant", "content": content, "tool_calls": calls})
        elif content or not results:
            out.append({"role": m["role"], "content": content})
    return out, images


def sampling_from_anthropic(
    body: dict[str, Any], max_tokens_limit: int | None = None
) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=get_int(body, "max_tokens", None, 1, max_tokens_limit),
            temperature=get_number(body, "temperature", 1.0, 0.0, 1.0),  # type: ignore[arg-type]
            top_p=get_number(body, "top_p", 1.0, 0.0, 1.0),  # type: ignore[arg-type]
            top_k=get_int(body, "top_k", -1, -1, MAX_TOP_K) or -1,
            stop=get_stop(body, "stop_sequences"),
            structured_outputs=structured_from_anthropic(body),
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def stop_fields(ch: Choice, called: bool = False) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) in Anthropic's terms; ``called``: tools were called."""
    if called:
        return "tool_use", None
    if ch.finish_reason == "length":
        return "max_tokens", None
    if ch.stop_reason:
        return "stop_sequence", ch.stop_reason
    return "end_turn", None


def _usage(u: Usage) -> dict[str, int]:
    return {
        "input_tokens": u.prompt,
        "output_tokens": u.completion,
        "cache_read_input_tokens": u.cached,
        "cache_creation_input_tokens": 0,
    }


async def prompt_of(
    gw: Gateway, body: dict[str, Any], tool_setup: ToolSetup
) -> tuple[list[int], list[pb.ImageData]]:
    """Token ids of a Messages request's prompt (system, messages and tools through the chat
    template, image placeholders expanded) and its images: what /v1/messages generates from
    and /v1/messages/count_tokens counts."""
    messages, sources = parse_messages(body)
    parser = tool_parser_class(gw.cfg.tool_call_parser)
    messages, tools = prepare(gw.tokenizer, messages, tool_setup, parser)
    return await chat_prompt(gw.tokenizer, messages, sources, gw.cfg.image_limits, tools=tools,
                             offload=gw.offload)  # fmt: skip


def _params_and_tools(gw: Gateway, body: dict[str, Any]) -> tuple[SamplingParams, ToolSetup]:
    """The request's sampling parameters and tools, their grammars compiled."""
    params = sampling_from_anthropic(body, gw.cfg.max_tokens_limit)
    tool_setup = anthropic_tools(body)
    if tool_setup.schema is not None and params.structured_outputs is not None:
        raise bad_request("tool_choice 'any' or 'tool' cannot be combined with an output "
                          "format", param="tool_choice")  # fmt: skip
    return params, tool_setup


async def count_tokens(gw: Gateway, request: Request) -> Response:
    """POST /v1/messages/count_tokens: ``{"input_tokens": N}``, the prompt length /v1/messages
    would have for the same body (no ``max_tokens`` needed, no context-length check)."""
    try:
        body = await read_json_object(request, gw.cfg.max_body_bytes)
        gw.resolve_model(get(body, "model", str, required=True), serving=False)
        tool_setup = await gw.offload.run(None if may_compile(body) else 0, anthropic_tools, body)
        prompt, _ = await prompt_of(gw, body, tool_setup)
    except APIError as err:
        gw.metrics.count_request("count_tokens", err.status)
        return err.anthropic_response()
    gw.metrics.count_request("count_tokens", 200)
    return JSONResponse({"input_tokens": len(prompt)})


async def handle(gw: Gateway, request: Request) -> Response:
    started = time.monotonic()
    try:
        body = await read_json_object(request, gw.cfg.max_body_bytes)
        get(body, "max_tokens", int, required=True)
        model, max_len = gw.resolve_model(get(body, "model", str, required=True))
        stream = get(body, "stream", bool, False)
        # NOTE: a constraint's grammar compiles while the parameters are read: off the loop.
        params, tool_setup = await gw.offload.run(
            None if may_compile(body) else 0, _params_and_tools, gw, body
        )
        prompt, images = await prompt_of(gw, body, tool_setup)
        check_context(len(prompt), params.max_tokens, max_len)
        ticket = gw.admission.admit(len(prompt))
    except APIError as err:
        gw.metrics.count_request("messages", err.status)
        return err.anthropic_response()
    mid = "msg_" + uuid.uuid4().hex
    proto = params_to_proto(params)
    tool_setup.constrain(proto)  # tool_choice "any" / "tool"
    gen = merge_streams([gw.orchestrator.generate(model, mid, prompt, proto, images=images)])
    tool_stream = tool_setup.stream(tool_parser_class(gw.cfg.tool_call_parser))
    reasoning = None
    if params.structured_outputs is None and tool_setup.schema is None:
        # NOTE: a constrained output is the JSON alone, with no thinking to split off.
        cls = reasoning_parser_class(gw.cfg.reasoning_parser)
        reasoning = cls() if cls is not None else None
    if stream:
        try:
            first = await until_disconnect(request, anext(gen))
        except StopAsyncIteration:
            ticket.release()
            gw.metrics.count_request("messages", 500)
            return APIError(500, "the worker ended the request without output").anthropic_response()
        except APIError as err:
            ticket.release()
            gw.metrics.count_request("messages", err.status)
            await gen.aclose()
            return err.anthropic_response()
        except BaseException:
            ticket.release()
            await gen.aclose()
            raise
        return StreamingResponse(
            _stream(gw, mid, model, first, gen, started, tool_stream, reasoning),
            media_type="text/event-stream",
            background=BackgroundTask(ticket.release),
        )  # fmt: skip
    try:
        result = await until_disconnect(
            request, _collect(gw, mid, model, gen, started, tool_stream, reasoning)
        )
    except APIError as err:
        gw.metrics.count_request("messages", err.status)
        return err.anthropic_response()
    finally:
        ticket.release()
    gw.metrics.count_request("messages", 200)
    return JSONResponse(result)


async def _collect(
    gw: Gateway, mid: str, model: str, gen: AsyncIterator[tuple[int, pb.GenerateResponse]],
    started: float, tool_stream: ToolStream | None = None,
    reasoning: ReasoningParser | None = None,
) -> dict[str, Any]:  # fmt: skip
    choices: dict[int, Choice] = {}
    usage = Usage()
    first = True
    async for _, msg in gen:
        if first:
            first = False
            gw.metrics.first_token("messages", model, started)
        apply_step(choices, usage, 0, 1, msg)
    gw.metrics.done("messages", model, started, usage.prompt, usage.completion)
    ch = choices.get(0, Choice(index=0))
    thought, text = extract_reasoning(reasoning, ch.full_text) if reasoning else ("", ch.full_text)
    events = tool_stream.feed(text, final=True) if tool_stream else [text]
    if thought and events == [""]:
        events = []  # all thinking: no empty text block after it
    content: list[dict[str, Any]] = (
        [{"type": "thinking", "thinking": thought, "signature": ""}] if thought else []
    )
    content += [
        {"type": "text", "text": e} if isinstance(e, str) else
        {"type": "tool_use", "id": anthropic_call_id(), "name": e.name, "input": anthropic_input(e)}
        for e in events
    ]  # fmt: skip
    reason, seq = stop_fields(ch, called=any(c["type"] == "tool_use" for c in content))
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content or [{"type": "text", "text": ""}],
        "stop_reason": reason,
        "stop_sequence": seq,
        "usage": _usage(usage),
    }


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Blocks:
    """The content blocks of a streamed message: the reasoning goes to a ``thinking`` block
    (first), text to an open text block (opened on its first text), each tool call is a
    ``tool_use`` block of its own."""

    def __init__(self) -> None:
        self.index = -1  # of the latest block
        self.open: str | None = None  # type of the open block: "text" | "thinking"
        self.called = False  # a tool_use block was sent

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _delta(self, kind: str, block: dict[str, Any], delta: dict[str, Any]) -> list[str]:
        """A delta of a ``kind`` block, opening one (``block``) unless it is open."""
        out = []
        if self.open != kind:
            out += self._close()
            self.index += 1
            self.open = kind
            out.append(_event("content_block_start", {"type": "content_block_start",
                "index": self.index, "content_block": block}))  # fmt: skip
        out.append(_event("content_block_delta", {"type": "content_block_delta",
            "index": self.index, "delta": delta}))  # fmt: skip
        return out

    def text(self, text: str) -> list[str]:
        return self._delta("text", {"type": "text", "text": ""},
                           {"type": "text_delta", "text": text})  # fmt: skip

    def thinking(self, text: str) -> list[str]:
        return self._delta("thinking", {"type": "thinking", "thinking": "", "signature": ""},
                           {"type": "thinking_delta", "thinking": text})  # fmt: skip

    def tool_use(self, call: ParsedCall) -> list[str]:
        out = self._close()
        self.index += 1
        self.called = True
        block = {"type": "tool_use", "id": anthropic_call_id(), "name": call.name, "input": {}}
        return out + [
            _event("content_block_start", {"type": "content_block_start", "index": self.index,
                                           "content_block": block}),
            _event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                "delta": {"type": "input_json_delta", "partial_json": call.arguments}}),
            _event("content_block_stop", {"type": "content_block_stop", "index": self.index}),
        ]  # fmt: skip

    def output(
        self, tool_stream: ToolStream | None, reasoning: ReasoningParser | None, text: str,
        final: bool,
    ) -> list[str]:  # fmt: skip
        """Events of the next piece of output."""
        out = []
        if reasoning is not None:
            thought, text = reasoning.feed(text, final)
            out += self.thinking(thought) if thought else []
        if tool_stream is None:
            return out + (self.text(text) if text else [])
        for ev in tool_stream.feed(text, final):
            out += self.text(ev) if isinstance(ev, str) else self.tool_use(ev)
        return out

    def end(self) -> list[str]:
        """Close the open block; a message with no block gets an empty text block."""
        return (self.text("")[:1] if self.index < 0 else []) + self._close()


async def _stream(
    gw: Gateway, mid: str, model: str, first: tuple[int, pb.GenerateResponse],
    gen: AsyncGenerator[tuple[int, pb.GenerateResponse], None], started: float,
    tool_stream: ToolStream | None = None, reasoning: ReasoningParser | None = None,
) -> AsyncIterator[str]:  # fmt: skip
    choices: dict[int, Choice] = {}
    usage = Usage()
    status = "200"
    blocks = _Blocks()
    gw.metrics.first_token("messages", model, started)
    try:
        apply_step(choices, usage, 0, 1, first[1])
        yield _event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {**_usage(usage), "output_tokens": 0},
        }})  # fmt: skip
        pending = [first[1]]
        while True:
            for msg in pending:
                for d in msg.outputs:
                    for e in blocks.output(tool_stream, reasoning, d.text, bool(d.finish_reason)):
                        yield e
            try:
                _, nxt = await anext(gen)
            except StopAsyncIteration:
                break
            apply_step(choices, usage, 0, 1, nxt)
            pending = [nxt]
        for e in blocks.output(tool_stream, reasoning, "", True) + blocks.end():
            yield e
        ch = choices.get(0, Choice(index=0))
        reason, seq = stop_fields(ch, called=blocks.called)
        yield _event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
            "usage": {"output_tokens": usage.completion},
        })  # fmt: skip
        yield _event("message_stop", {"type": "message_stop"})
        gw.metrics.done("messages", model, started, usage.prompt, usage.completion)
    except APIError as err:
        status = str(err.status)
        yield _event("error", err.anthropic_body())
    finally:
        await gen.aclose()
        gw.metrics.count_request("messages", status)
