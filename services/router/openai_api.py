"""OpenAI-compatible endpoints: /v1/chat/completions and /v1/completions."""

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
from services.engine.sampling_params import (
    MAX_TOKEN_COUNT,
    MAX_TOP_K,
    REPETITION_PENALTY_RANGE,
    SamplingParams,
)
from services.router.accumulate import Choice, Usage, apply_step, until_disconnect
from services.router.errors import APIError, bad_request
from services.router.images import chat_prompt
from services.router.reasoning.base import ReasoningParser, extract_reasoning
from services.router.reasoning.factory import reasoning_parser_class
from services.router.streams import merge_streams
from services.router.structured import may_compile, structured_from_openai
from services.router.tokenization import check_token_ids
from services.router.tool_parsers.base import ToolStream, extract
from services.router.tool_parsers.factory import tool_parser_class
from services.router.tools import (
    ToolSetup,
    openai_deltas,
    openai_tool_call,
    openai_tool_calls,
    openai_tools,
    prepare,
)
from services.router.validation import (
    get,
    get_int,
    get_logit_bias,
    get_number,
    get_stop,
    read_json_object,
)
from services.worker.convert import params_to_proto

if TYPE_CHECKING:
    from services.router.gateway import Gateway


def sampling_from_openai(
    body: dict[str, Any], *, chat: bool, max_n: int = 64, max_tokens_limit: int | None = None
) -> SamplingParams:
    """SamplingParams from OpenAI fields (plus vLLM-style extensions); 400 on bad values."""
    max_tokens = get_int(body, "max_completion_tokens", None, 1, max_tokens_limit) if chat else None
    if max_tokens is None:
        default = None if chat else min(16, max_tokens_limit or 16)
        max_tokens = get_int(body, "max_tokens", default, 1, max_tokens_limit)
    if max_tokens is None:
        max_tokens = max_tokens_limit  # chat without a bound: the router's limit, if any
    if chat:
        want = get(body, "logprobs", bool, False)
        top = get_int(body, "top_logprobs", None, 0, 20)
        if top is not None and not want:
            raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = get_int(body, "logprobs", None, 0, 20)
    stop_ids = get(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) for t in stop_ids):
        raise bad_request("'stop_token_ids' must be an array of integers", param="stop_token_ids")
    structured = structured_from_openai(body)
    try:
        return SamplingParams(
            n=get_int(body, "n", 1, 1, max_n) or 1,
            temperature=get_number(body, "temperature", 1.0, 0.0, 2.0),  # type: ignore[arg-type]
            top_p=get_number(body, "top_p", 1.0, 0.0, 1.0),  # type: ignore[arg-type]
            top_k=get_int(body, "top_k", -1, -1, MAX_TOP_K) or -1,
            min_p=get_number(body, "min_p", 0.0, 0.0, 1.0),  # type: ignore[arg-type]
            seed=get_int(body, "seed", None, -(2**63), 2**63 - 1),
            presence_penalty=get_number(body, "presence_penalty", 0.0, -2.0, 2.0),  # type: ignore[arg-type]
            frequency_penalty=get_number(body, "frequency_penalty", 0.0, -2.0, 2.0),  # type: ignore[arg-type]
            repetition_penalty=get_number(body, "repetition_penalty", 1.0, *REPETITION_PENALTY_RANGE),  # type: ignore[arg-type]
            max_tokens=max_tokens,
            min_tokens=get_int(body, "min_tokens", 0, 0, MAX_TOKEN_COUNT) or 0,
            stop=get_stop(body, "stop"),
            stop_token_ids=stop_ids,
            ignore_eos=get(body, "ignore_eos", bool, False),
            logprobs=logprobs,
            include_stop_str_in_output=get(body, "include_stop_str_in_output", bool, False),
            skip_special_tokens=get(body, "skip_special_tokens", bool, True),
            structured_outputs=structured,
            logit_bias=get_logit_bias(body),
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
    if max_model_len <= 0:
        return
    total = prompt_len + (max_tokens or 0)
    if prompt_len >= max_model_len or total > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {total} tokens ({prompt_len} in the prompt, {max_tokens or 0} for the "
            "completion). Please reduce the prompt or the completion length.",
            param="messages", code="context_length_exceeded",
        )  # fmt: skip


def chat_messages(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str | bytes]]:
    """Messages for the chat template and the image URLs of their ``image_url`` parts, in
    order. A message without images keeps string content (what text-only templates expect)."""
    msgs = get(body, "messages", list, required=True)
    if not msgs:
        raise bad_request("'messages' must not be empty", param="messages")
    out: list[dict[str, Any]] = []
    images: list[str | bytes] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a 'role'", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts: list[dict[str, Any]] = []
            for p in content:
                if not isinstance(p, dict):
                    raise bad_request(f"messages[{i}]: content parts must be objects",
                                      param="messages")  # fmt: skip
                if p.get("type") == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif p.get("type") == "image_url":
                    images.append(_image_url(p.get("image_url"), i))
                    parts.append({"type": "image"})
                else:
                    raise bad_request(
                        f"messages[{i}]: content parts must be 'text' or 'image_url'",
                        param="messages",
                    )
            has_image = any(p["type"] == "image" for p in parts)
            content = parts if has_image else "".join(p["text"] for p in parts)
        elif not isinstance(content, str):
            raise bad_request(
                f"messages[{i}].content must be a string or an array", param="messages"
            )
        msg: dict[str, Any] = {"role": m["role"], "content": content}
        if m["role"] == "assistant" and (calls := openai_tool_calls(m, i)):
            msg["tool_calls"] = calls
        elif m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out, images


def _image_url(value: Any, i: int) -> str:
    """The URL of an ``image_url`` part: ``{"url": ...}`` (or a bare string)."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"messages[{i}]: image_url needs a 'url' string", param="messages")
    return url


def prompt_size(gw: Gateway, body: dict[str, Any]) -> int:
    """Characters or token ids of a completions ``prompt`` (what ``completion_prompts`` reads:
    off the event loop when large); the items of a list of prompts are counted up to one past
    ``--max-prompts``."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return sum(len(p) if isinstance(p, (str, list)) else 1
                   for p in prompt[: gw.cfg.max_prompts + 1])  # fmt: skip
    return len(prompt) if isinstance(prompt, (str, list)) else 0


def completion_prompts(gw: Gateway, body: dict[str, Any]) -> list[list[int]]:
    """Token ids of each prompt of a /v1/completions body (text encoded, ids checked)."""
    prompt = get(body, "prompt", (str, list), required=True)
    if isinstance(prompt, str):
        return [gw.tokenizer.encode(prompt)]
    if not prompt:
        raise bad_request("'prompt' must not be empty", param="prompt")
    if isinstance(prompt[0], (str, list)) and len(prompt) > gw.cfg.max_prompts:
        raise bad_request(
            f"'prompt' holds {len(prompt)} prompts; at most {gw.cfg.max_prompts} are accepted",
            param="prompt",
        )
    vocab = gw.tokenizer.vocab_size
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [check_token_ids(list(prompt), vocab, "prompt")]
    if all(isinstance(p, str) for p in prompt):
        return [gw.tokenizer.encode(p) for p in prompt]
    if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
        return [check_token_ids(list(p), vocab, "prompt") for p in prompt]
    raise bad_request(
        "'prompt' must be a string, an array of strings or of token ids", param="prompt"
    )


async def chat_prompt_of(
    gw: Gateway, body: dict[str, Any], tool_setup: ToolSetup | None,
    add_generation_prompt: bool = True,
) -> tuple[list[int], list[pb.ImageData]]:  # fmt: skip
    """Token ids of a chat request's prompt (messages and tools through the chat template,
    image placeholders expanded) and its images: what /v1/chat/completions generates from and
    /tokenize counts."""
    messages, sources = chat_messages(body)
    parser = tool_parser_class(gw.cfg.tool_call_parser)
    messages, tools = prepare(gw.tokenizer, messages, tool_setup, parser)
    return await chat_prompt(
        gw.tokenizer, messages, sources, gw.cfg.image_limits, tools=tools,
        add_generation_prompt=add_generation_prompt, offload=gw.offload,
    )  # fmt: skip


def _chat_logprobs(gw: Gateway, items: list[pb.TokenLogprobs]) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        s = gw.tokenizer.token_str(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {
        "content": [
            {
                **entry(t.token_id, t.logprob),
                "top_logprobs": [entry(c.token_id, c.logprob) for c in t.top],
            }
            for t in items
        ]
    }


def _completion_logprobs(gw: Gateway, items: list[pb.TokenLogprobs], offset: int) -> dict[str, Any]:
    tokens = [gw.tokenizer.token_str(t.token_id) for t in items]
    offsets, pos = [], offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [
            {gw.tokenizer.token_str(c.token_id): c.logprob for c in t.top} for t in items
        ],
        "text_offset": offsets,
    }


async def handle(gw: Gateway, request: Request, *, chat: bool) -> Response:
    """Entry point of both endpoints; every error comes back in OpenAI's format."""
    api = "chat" if chat else "completions"
    started = time.monotonic()
    try:
        body = await read_json_object(request, gw.cfg.max_body_bytes)
        model, max_len = gw.resolve_model(get(body, "model", str, required=True))
        stream = get(body, "stream", bool, False)
        opts = get(body, "stream_options", dict, {}) or {}
        include_usage = bool(opts.get("include_usage", False))
        if not chat and get(body, "echo", bool, False):
            raise bad_request("'echo' is not supported", param="echo")
        # NOTE: a constraint's grammar compiles while the parameters are read: off the loop.
        params, tool_setup = await gw.offload.run(
            None if may_compile(body) else 0, _params_and_tools, gw, body, chat
        )
        images: list[pb.ImageData] = []
        if chat:
            prompt, images = await chat_prompt_of(gw, body, tool_setup)
            prompts = [prompt]
        else:
            prompts = await gw.offload.run(prompt_size(gw, body), completion_prompts, gw, body)
        for p in prompts:
            check_context(len(p), params.max_tokens, max_len)
        ticket = gw.admission.admit(sum(len(p) for p in prompts))
    except APIError as err:
        gw.metrics.count_request(api, err.status)
        return err.openai_response()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    ctx = _Ctx(gw, api, chat, rid, model, params.n, params.logprobs is not None, started)
    ctx.tools = tool_setup
    constrained = params.structured_outputs or (tool_setup and tool_setup.schema is not None)
    if chat and not constrained:  # NOTE: a constrained output is the JSON alone, no thinking
        ctx.reasoning = reasoning_parser_class(gw.cfg.reasoning_parser)
    streams = [
        gw.orchestrator.generate(
            model,
            f"{rid}-{i}" if len(prompts) > 1 else rid,
            p,
            _to_proto(params, tool_setup),
            images,
        )
        for i, p in enumerate(prompts)
    ]
    if stream:
        merged = merge_streams(streams)
        try:
            # Wait for the first step before sending headers, so that errors up to then
            # (no worker, rejected by the engine) still get their HTTP status.
            first = await until_disconnect(request, anext(merged))
        except StopAsyncIteration:
            ticket.release()
            gw.metrics.count_request(api, 500)
            return APIError(500, "the worker ended the request without output").openai_response()
        except APIError as err:
            ticket.release()
            gw.metrics.count_request(api, err.status)
            await merged.aclose()
            return err.openai_response()
        except BaseException:
            ticket.release()
            await merged.aclose()
            raise
        # NOTE: the background task runs even when the client leaves before the body starts.
        return StreamingResponse(
            _stream(ctx, merged, first, include_usage), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"}, background=BackgroundTask(ticket.release),
        )  # fmt: skip
    try:
        result = await until_disconnect(request, _collect(ctx, streams))
    except APIError as err:
        gw.metrics.count_request(api, err.status)
        return err.openai_response()
    finally:
        ticket.release()
    gw.metrics.count_request(api, 200)
    return JSONResponse(result)


def _params_and_tools(
    gw: Gateway, body: dict[str, Any], chat: bool
) -> tuple[SamplingParams, ToolSetup | None]:
    """The request's sampling parameters and (chat) tools, their grammars compiled."""
    params = sampling_from_openai(
        body, chat=chat, max_n=gw.cfg.max_n, max_tokens_limit=gw.cfg.max_tokens_limit
    )
    tool_setup = openai_tools(body) if chat else None
    if tool_setup is not None and tool_setup.schema is not None and params.structured_outputs:
        raise bad_request(
            "tool_choice 'required' or a named function cannot be combined with "
            "structured outputs", param="tool_choice",
        )  # fmt: skip
    return params, tool_setup


def _to_proto(params: SamplingParams, tools: ToolSetup | None) -> pb.SamplingParams:
    proto = params_to_proto(params)
    if tools is not None:
        tools.constrain(proto)  # tool_choice "required" / a named function
    return proto


class _Ctx:
    def __init__(self, gw: Gateway, api: str, chat: bool, rid: str, model: str, n: int,
                 logprobs: bool, started: float) -> None:  # fmt: skip
        self.gw, self.api, self.chat, self.rid, self.model, self.n = gw, api, chat, rid, model, n
        self.logprobs = logprobs
        self.started = started
        self.created = int(time.time())
        self.first_token_seen = False
        self.tools: ToolSetup | None = None  # chat: the request's tools
        self.reasoning: type[ReasoningParser] | None = None  # chat: splits off the reasoning

    def tool_stream(self) -> ToolStream | None:
        """A tool-call parser for one choice; None: its output is plain content."""
        if self.tools is None:
            return None
        return self.tools.stream(tool_parser_class(self.gw.cfg.tool_call_parser))

    def reasoning_parser(self) -> ReasoningParser | None:
        """A reasoning parser for one choice; None: its output is all content."""
        return self.reasoning() if self.reasoning is not None else None

    def on_step(self) -> None:
        if not self.first_token_seen:
            self.first_token_seen = True
            self.gw.metrics.first_token(self.api, self.model, self.started)

    def done(self, usage: Usage) -> None:
        self.gw.metrics.done(self.api, self.model, self.started, usage.prompt, usage.completion)


async def _collect(
    ctx: _Ctx, streams: list[AsyncGenerator[pb.GenerateResponse, None]]
) -> dict[str, Any]:
    choices: dict[int, Choice] = {}
    usage = Usage()
    ctx.gw.metrics.inflight.inc()
    try:
        async for pi, msg in merge_streams(streams):
            ctx.on_step()
            apply_step(choices, usage, pi, ctx.n, msg)
    finally:
        ctx.gw.metrics.inflight.dec()
    ctx.done(usage)
    out = []
    for idx in sorted(choices):
        ch = choices[idx]
        item: dict[str, Any] = {"index": idx, "finish_reason": ch.finish_reason}
        if ctx.chat:
            text, reasoning = ch.full_text, ""
            if (rp := ctx.reasoning_parser()) is not None:
                reasoning, text = extract_reasoning(rp, text)
            item["message"] = {"role": "assistant", "content": text or (None if reasoning else "")}
            if reasoning:
                item["message"].update(reasoning_fields(reasoning))
            tool_stream = ctx.tool_stream()
            if tool_stream is not None:
                content, calls = extract(tool_stream, text)
                item["message"]["content"] = content or (None if calls or reasoning else "")
                if calls:
                    item["message"]["tool_calls"] = [openai_tool_call(c) for c in calls]
                    item["finish_reason"] = "tool_calls"
            item["logprobs"] = _chat_logprobs(ctx.gw, ch.logprobs) if ctx.logprobs else None
        else:
            item["text"] = ch.full_text
            item["logprobs"] = (
                _completion_logprobs(ctx.gw, ch.logprobs, 0) if ctx.logprobs else None
            )
            item["stop_reason"] = ch.stop_reason
        out.append(item)
    return {
        "id": ctx.rid,
        "object": "chat.completion" if ctx.chat else "text_completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": out,
        "usage": usage.openai(),
        "system_fingerprint": None,
    }


def reasoning_fields(text: str) -> dict[str, str]:
    """The reasoning of a message or delta: under vLLM's current name (``reasoning``) and
    its earlier one (``reasoning_content``, which DeepSeek's API and many clients read)."""
    return {"reasoning_content": text, "reasoning": text}


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _prepend(
    first: tuple[int, pb.GenerateResponse], rest: AsyncIterator[tuple[int, pb.GenerateResponse]]
) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
    yield first
    async for item in rest:
        yield item


async def _stream(
    ctx: _Ctx,
    merged: AsyncGenerator[tuple[int, pb.GenerateResponse], None],
    first: tuple[int, pb.GenerateResponse],
    include_usage: bool,
) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if ctx.chat else "text_completion"
    base = {"id": ctx.rid, "object": obj, "created": ctx.created, "model": ctx.model}
    extra = {"usage": None} if include_usage else {}
    choices: dict[int, Choice] = {}
    text_pos: dict[int, int] = {}
    usage = Usage()
    started_roles: set[int] = set()
    tool_streams: dict[int, ToolStream | None] = {}
    reasoning_parsers: dict[int, ReasoningParser | None] = {}
    status = "200"
    ctx.gw.metrics.inflight.inc()
    try:
        async for pi, msg in _prepend(first, merged):
            ctx.on_step()
            for ch, d in apply_step(choices, usage, pi, ctx.n, msg):
                item: dict[str, Any] = {"index": ch.index, "finish_reason": d.finish_reason or None}
                if ctx.chat:
                    if ch.index not in started_roles:
                        started_roles.add(ch.index)
                        opening = {"index": ch.index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}  # fmt: skip
                        yield _sse({**base, "choices": [opening], **extra})
                    item["logprobs"] = (
                        _chat_logprobs(ctx.gw, list(d.logprobs)) if ctx.logprobs else None
                    )
                    if ch.index not in tool_streams:
                        tool_streams[ch.index] = ctx.tool_stream()
                        reasoning_parsers[ch.index] = ctx.reasoning_parser()
                    text, reasoning = d.text, ""
                    if (rp := reasoning_parsers[ch.index]) is not None:
                        reasoning, text = rp.feed(d.text, bool(d.finish_reason))
                    item["delta"] = reasoning_fields(reasoning) if reasoning else {}
                    if (ts := tool_streams[ch.index]) is None:
                        if text:
                            item["delta"]["content"] = text
                    else:
                        # Tool calling (on the content only): the reasoning, then what the
                        # parser decided, go out in chunks of their own.
                        deltas = openai_deltas(ts, text, bool(d.finish_reason))
                        for delta in ([item["delta"]] if reasoning else []) + deltas:
                            yield _sse({**base, "choices": [{"index": ch.index, "delta": delta,
                                       "logprobs": None, "finish_reason": None}], **extra})  # fmt: skip
                        item["delta"] = {}
                        if d.finish_reason and ts.calls:
                            item["finish_reason"] = "tool_calls"
                else:
                    item["text"] = d.text
                    pos = text_pos.get(ch.index, 0)
                    item["logprobs"] = (
                        _completion_logprobs(ctx.gw, list(d.logprobs), pos)
                        if ctx.logprobs
                        else None
                    )
                    text_pos[ch.index] = pos + len(d.text)
                if (d.text and (not ctx.chat or item["delta"])) or d.finish_reason or d.logprobs:
                    yield _sse({**base, "choices": [item], **extra})
        ctx.done(usage)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage.openai()})
        yield "data: [DONE]\n\n"
    except APIError as err:
        status = str(err.status)
        yield _sse(err.openai_body())
    finally:
        await merged.aclose()
        ctx.gw.metrics.inflight.dec()
        ctx.gw.metrics.count_request(ctx.api, status)
