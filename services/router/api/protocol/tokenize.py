"""vLLM's /tokenize and /detokenize bodies: a completion prompt or a chat, and token ids."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from services.router.api.protocol.common import (
    APIModel,
    Array,
    Bool,
    ResponseModel,
    Str,
    Unsupported,
    parse,
)
from services.router.api.protocol.openai import ChatPrompt
from services.router.errors import bad_request


class OptionalModel(APIModel):
    """The model, checked before the rest; it may be left out when the cluster serves one
    (as vLLM allows)."""

    model: Str | None = None


class _Common(OptionalModel):
    return_token_strs: Bool = False


class TokenizeCompletionRequest(_Common):
    """POST /tokenize of a prompt, encoded as /v1/completions encodes it."""

    prompt: Str
    add_special_tokens: Bool = True


class _ChatOptions(_Common):
    continue_final_message: Unsupported = False
    add_generation_prompt: Bool = True


class TokenizeChatRequest(ChatPrompt, _ChatOptions):
    """POST /tokenize of a chat, rendered as /v1/chat/completions renders it."""


def tokenize_request(body: dict[str, Any]) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """A /tokenize body as the request it is: a chat when it has ``messages``."""
    if "messages" not in body:
        return parse(TokenizeCompletionRequest, body)
    parse(_Common, body)  # NOTE: checked before the clash below, as they always were
    if "prompt" in body:
        raise bad_request("give either 'prompt' or 'messages', not both")
    return parse(TokenizeChatRequest, body)


class DetokenizeRequest(OptionalModel):
    """POST /detokenize; the ids are checked against the vocabulary by the handler."""

    tokens: Annotated[Array, Field(json_schema_extra={"items": {"type": "integer",
                                                                 "minimum": 0}})]  # fmt: skip


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # with return_token_strs


class DetokenizeResponse(ResponseModel):
    prompt: str
