"""OpenAI-compatible endpoints: /v1/chat/completions and /v1/completions. A request is read
here (400s in OpenAI's format) into the serving pipeline's request; openai_output.py writes
the response."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from services.common.proto import worker_pb2 as pb
from services.engine.sampling_params import (
    MAX_TOKEN_COUNT,
    MAX_TOP_K,
    REPETITION_PENALTY_RANGE,
    SamplingParams,
)
from services.router.errors import APIError, bad_request
from services.router.openai_output import OpenAIOutput
from services.router.prompt import chat_prompt, check_context, completion_prompts, prompt_size
from services.router.serving import ServeRequest, serve
from services.router.structured import may_compile, structured_from_openai
from services.router.tool_prompt import openai_tool_calls
from services.router.tools import ToolSetup, openai_tools
from services.router.validation import (
    get,
    get_int,
    get_logit_bias,
    get_number,
    get_stop,
    read_json_object,
)

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
            prompt, images = await chat_prompt(gw, *chat_messages(body), tool_setup)
            prompts = [prompt]
        else:
            prompts = await gw.offload.run(prompt_size(gw, body), completion_prompts, gw, body)
        for p in prompts:
            check_context(len(p), params.max_tokens, max_len)
    except APIError as err:
        gw.metrics.count_request(api, err.status)
        return err.openai_response()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    req = ServeRequest.create(gw, api, rid, model, prompts, images, params, tool_setup, started)
    return await serve(gw, request, req, OpenAIOutput(gw, req, chat, include_usage), stream)


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
