"""vLLM's tokenizer endpoints: POST /tokenize and POST /detokenize, with the router's tokenizer.

/tokenize takes a ``prompt`` (encoded as /v1/completions encodes it) or chat ``messages``
(rendered as /v1/chat/completions renders them: same template, tools, image placeholders),
so its ``count`` is the ``prompt_tokens`` the generation endpoints would report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.router.api.openai import chat_messages
from services.router.api.protocol.body import read_json_object
from services.router.api.protocol.common import parse
from services.router.api.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    OptionalModel,
    TokenizeChatRequest,
    TokenizeResponse,
    tokenize_request,
)
from services.router.errors import APIError, bad_request
from services.router.features.structured import may_compile
from services.router.features.tools import openai_tools
from services.router.prompt import chat_prompt
from services.router.tokenization import Tokenizer, check_token_ids

if TYPE_CHECKING:
    from services.router.gateway import Gateway


async def _model(gw: Gateway, body: dict[str, Any]) -> tuple[int, Tokenizer]:
    """The context length and the tokenizer of the request's model: ``model`` may be left
    out (as vLLM allows) when the cluster serves one model; 404 for an unknown one."""
    name = parse(OptionalModel, body).model
    if name is None:
        models = gw.pool.models()
        if not models:
            raise APIError(503, "no workers available", code="no_workers")
        if len(models) > 1:
            raise bad_request("'model' is required: the cluster serves several", param="model")
        name = next(iter(models))
    name, max_len = gw.resolve_model(name, serving=False)
    return max_len, await gw.tokenizer(name)


async def _tokenize_body(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    max_len, tok = await _model(gw, body)
    typed = tokenize_request(body)
    if isinstance(typed, TokenizeChatRequest):
        tools = await gw.offload.run(None if may_compile(body) else 0, openai_tools, body)
        ids, _ = await chat_prompt(gw, tok, *chat_messages(typed.messages), tools,
                                   typed.add_generation_prompt, typed.chat_template_kwargs)  # fmt: skip
    else:
        ids = await gw.offload.run(len(typed.prompt), tok.encode, typed.prompt,
                                   typed.add_special_tokens)  # fmt: skip
    out = TokenizeResponse(count=len(ids), max_model_len=max_len, tokens=ids)
    if typed.return_token_strs:
        out.token_strs = await gw.offload.run(len(ids), tok.token_strs, ids)
    return out.model_dump(exclude_none=True)


async def _detokenize_body(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    tok = (await _model(gw, body))[1]
    tokens = parse(DetokenizeRequest, body).tokens
    text = await gw.offload.run(len(tokens), _decode, tok, tokens)
    return DetokenizeResponse(prompt=text).model_dump()


def _decode(tok: Tokenizer, tokens: list[Any]) -> str:
    return str(tok.decode(check_token_ids(tokens, tok.vocab_size, "tokens")))


async def tokenize(gw: Gateway, request: Request) -> Response:
    """POST /tokenize: ``{"count", "max_model_len", "tokens"[, "token_strs"]}``."""
    try:
        result = await _tokenize_body(gw, await read_json_object(request, gw.cfg.max_body_bytes))
    except APIError as err:
        gw.metrics.count_request("tokenize", err.status)
        return err.openai_response()
    gw.metrics.count_request("tokenize", 200)
    return JSONResponse(result)


async def detokenize(gw: Gateway, request: Request) -> Response:
    """POST /detokenize: ``{"prompt": text}`` of ``tokens``."""
    try:
        body = await read_json_object(request, gw.cfg.max_body_bytes)
        result = await _detokenize_body(gw, body)
    except APIError as err:
        gw.metrics.count_request("detokenize", err.status)
        return err.openai_response()
    gw.metrics.count_request("detokenize", 200)
    return JSONResponse(result)
