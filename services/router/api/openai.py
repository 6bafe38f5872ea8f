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
from services.engine.sampling_params import SamplingParams
from services.router.api.openai_output import OpenAIOutput
from services.router.api.protocol.body import read_json_object
from services.router.api.protocol.common import model_name, parse
from services.router.api.protocol.openai import (
    ChatCompletionRequest,
    ChatSampling,
    CompletionRequest,
    CompletionSampling,
)
from services.router.auth import key_tiers
from services.router.errors import APIError, bad_request, empty_array
from services.router.features.structured import may_compile, structured_from_openai
from services.router.features.tool_prompt import openai_tool_calls
from services.router.features.tools import ToolSetup, openai_tools
from services.router.prompt import chat_prompt, check_context, completion_prompts, prompt_size
from services.router.serving import ServeRequest, serve
from services.router.tiers import openai_params

if TYPE_CHECKING:
    from services.router.gateway import Gateway
    from services.router.tokenization import Tokenizer


def sampling_from_openai(
    body: dict[str, Any], *, chat: bool, max_n: int = 64, max_tokens_limit: int | None = None
) -> SamplingParams:
    """SamplingParams from OpenAI fields (plus vLLM-style extensions); 400 on bad values."""
    model: type[ChatSampling | CompletionSampling] = ChatSampling if chat else CompletionSampling
    fields = parse(model, body, max_n=max_n, max_tokens_limit=max_tokens_limit)
    return fields.sampling_params(structured_from_openai(body), max_tokens_limit)


def chat_messages(msgs: list[Any]) -> tuple[list[dict[str, Any]], list[str | bytes]]:
    """Messages for the chat template and the image URLs of their ``image_url`` parts, in
    order. A message without images keeps string content (what text-only templates expect)."""
    out: list[dict[str, Any]] = []
    images: list[str | bytes] = []
    called: set[str] | None = None  # ids of the tool calls the tool messages now answer
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a 'role'", param="messages")
        if m["role"] != "tool":
            called = None
        content = m.get("content")
        if "name" in m and not isinstance(m["name"], str | None):
            raise bad_request(f"Invalid type for 'messages[{i}].name': expected a string.",
                              param="messages")  # fmt: skip
        if content is None and m["role"] != "assistant":  # (which may hold only tool_calls)
            raise bad_request(f"Missing required parameter: 'messages[{i}].content'.",
                              param="messages")  # fmt: skip
        if content is None:
            content = ""
        elif isinstance(content, list):
            if not content:  # OpenAI's schema: minItems 1 (vLLM reads it as "")
                raise empty_array(f"messages[{i}].content")
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
            called = {c["id"] for c in calls if "id" in c}
        elif m["role"] == "tool":
            msg["tool_call_id"] = _answered_call(m, i, called)
        out.append(msg)
    return out, images


def _answered_call(m: dict[str, Any], i: int, called: set[str] | None) -> str:
    """The ``tool_call_id`` of tool message ``i``; a 400 (OpenAI's words) unless it answers a
    call of the assistant message before its run of tool messages: the API refuses it, and the
    prompt would hold an answer to no call."""
    if called is None:
        raise bad_request(f"Invalid parameter: messages[{i}]: messages with role 'tool' must "
                          "be a response to a preceeding message with 'tool_calls'.",
                          param="messages")  # fmt: skip
    call_id = m.get("tool_call_id")
    if not isinstance(call_id, str):
        raise bad_request(f"messages[{i}].tool_call_id must be a string", param="messages")
    if call_id not in called:
        raise bad_request(f"Invalid parameter: messages[{i}]: 'tool_call_id' of '{call_id}' "
                          "not found in 'tool_calls' of previous message.", param="messages")  # fmt: skip
    return call_id


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
        model, max_len = await gw.resolve_awake(model_name(body))
        tok = await gw.tokenizer(model)
        # NOTE: off the loop: a constraint's grammar compiles while the body is read, and a
        # long completions prompt is checked.
        size = None if may_compile(body) else (0 if chat else prompt_size(gw, body))
        typed, params, tool_setup = await gw.offload.run(size, read_request, gw, body, chat)
        params = openai_params(params, typed.service_tier, key_tiers(request))
        images: list[pb.ImageData] = []
        echo: list[str] | None = None
        if isinstance(typed, ChatCompletionRequest):
            prompt, images = await chat_prompt(gw, tok, *chat_messages(typed.messages), tool_setup,
                                               typed.add_generation_prompt,
                                               typed.chat_template_kwargs)  # fmt: skip
            prompts = [prompt]
        else:
            prompts = await gw.offload.run(
                prompt_size(gw, body), completion_prompts, tok, typed.prompt
            )
            if typed.echo:
                echo = await gw.offload.run(prompt_size(gw, body), echo_texts, tok, typed.prompt)
        for p in prompts:
            check_context(len(p), params.max_tokens, max_len)
    except APIError as err:
        gw.metrics.count_request(api, err.status)
        return err.openai_response()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    req = ServeRequest.create(gw, api, rid, model, prompts, images, params, tool_setup, started)
    include_usage = bool((typed.stream_options or {}).get("include_usage", False))
    output = OpenAIOutput(req, tok, chat, include_usage, echo)
    return await serve(gw, request, req, output, typed.stream)


def echo_texts(tok: Tokenizer, prompt: str | list[Any]) -> list[str]:
    """What ``echo`` puts before each prompt's choices: the prompt as sent, ids decoded."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(t, int) for t in prompt):
        return [tok.decode(prompt)]
    return [p if isinstance(p, str) else tok.decode(p) for p in prompt]


def read_request(
    gw: Gateway, body: dict[str, Any], chat: bool
) -> tuple[ChatCompletionRequest | CompletionRequest, SamplingParams, ToolSetup | None]:
    """The typed request, its sampling parameters and (chat) tools, their grammars compiled."""
    cfg = gw.cfg
    model: type[ChatCompletionRequest | CompletionRequest]
    model = ChatCompletionRequest if chat else CompletionRequest
    typed = parse(model, body, max_n=cfg.max_n, max_tokens_limit=cfg.max_tokens_limit,
                  max_prompts=cfg.max_prompts)  # fmt: skip
    params = typed.sampling_params(structured_from_openai(body), cfg.max_tokens_limit)
    tool_setup = openai_tools(body) if chat else None
    if isinstance(typed, CompletionRequest) and typed.echo and params.logprobs is not None:
        # vLLM answers the prompt's logprobs there; this engine computes none.
        raise bad_request("'echo' with 'logprobs' is not supported", param="echo")
    if tool_setup is not None and tool_setup.schema is not None and params.structured_outputs:
        raise bad_request(
            "tool_choice 'required' or a named function cannot be combined with "
            "structured outputs", param="tool_choice",
        )  # fmt: skip
    return typed, params, tool_setup
