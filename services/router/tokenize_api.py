"""vLLM's tokenizer endpoints: POST /tokenize and POST /detokenize, with the router's tokenizer.

/tokenize takes a ``prompt`` (encoded as /v1/completions encodes it) or chat ``messages``
(rendered as /v1/chat/completions renders them: same template, tools, image placeholders),
so its ``count`` is the ``prompt_tokens`` the generation endpoints would report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.router.errors import APIError, bad_request
from services.router.openai_api import chat_messages
from services.router.prompt import chat_prompt
from services.router.structured import may_compile
from services.router.tokenization import check_token_ids
from services.router.tools import openai_tools
from services.router.validation import get, read_json_object

if TYPE_CHECKING:
    from services.router.gateway import Gateway


def _model_len(gw: Gateway, body: dict[str, Any]) -> int:
    """The context length of the request's model: ``model`` may be left out (as vLLM allows)
    when the cluster serves one model; 404 for an unknown one."""
    name = get(body, "model", str)
    if name is None:
        models = gw.pool.models()
        if not models:
            raise APIError(503, "no workers available", code="no_workers")
        if len(models) > 1:
            raise bad_request("'model' is required: the cluster serves several", param="model")
        name = next(iter(models))
    return gw.resolve_model(name, serving=False)[1]


async def _tokenize_body(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    max_len = _model_len(gw, body)
    want_strs = get(body, "return_token_strs", bool, False)
    if "messages" in body:
        if "prompt" in body:
            raise bad_request("give either 'prompt' or 'messages', not both")
        if get(body, "continue_final_message", bool, False):
            raise bad_request("'continue_final_message' is not supported",
                              param="continue_final_message")  # fmt: skip
        add_generation_prompt = get(body, "add_generation_prompt", bool, True)
        tools = await gw.offload.run(None if may_compile(body) else 0, openai_tools, body)
        ids, _ = await chat_prompt(gw, *chat_messages(body), tools, add_generation_prompt)
    else:
        prompt = get(body, "prompt", str, required=True)
        add_special = get(body, "add_special_tokens", bool, True)
        ids = await gw.offload.run(len(prompt), gw.tokenizer.encode, prompt, add_special)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": max_len, "tokens": ids}
    if want_strs:
        out["token_strs"] = await gw.offload.run(len(ids), gw.tokenizer.token_strs, ids)
    return out


async def _detokenize_body(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    _model_len(gw, body)
    tokens = get(body, "tokens", list, required=True)
    return {"prompt": await gw.offload.run(len(tokens), _decode, gw, tokens)}


def _decode(gw: Gateway, tokens: list[Any]) -> str:
    return str(gw.tokenizer.decode(check_token_ids(tokens, gw.tokenizer.vocab_size, "tokens")))


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
