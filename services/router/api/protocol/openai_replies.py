"""The bodies the OpenAI endpoints answer with: chat.completion, text_completion, the model
list (documentation for /openapi.json and the SDK-shape tests)."""

from __future__ import annotations

from typing import Any, Literal

from services.router.api.protocol.common import ResponseModel
from services.router.api.protocol.openai import ToolCall


class PromptTokensDetails(ResponseModel):
    cached_tokens: int


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ResponseMessage(ResponseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None  # with a reasoning parser (also as ``reasoning``)
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(ResponseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class ChatCompletion(ResponseModel):
    """A whole chat completion (stream=false)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None
    service_tier: Literal["default", "flex", "priority"]  # the tier that served it


class CompletionChoice(ResponseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None
    stop_reason: str | None  # the stop string that ended it


class Completion(ResponseModel):
    """A whole completion (stream=false)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: None
    service_tier: Literal["default", "flex", "priority"]  # the tier that served it


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    # A LoRA adapter: the base model it adapts (vLLM's field); None for a base model.
    parent: str | None = None
    # Anthropic's ModelInfo, so that one object answers both SDKs (api/models.py).
    type: Literal["model"]
    display_name: str
    created_at: str  # RFC 3339
    lifecycle: Literal["active"]
    max_input_tokens: int
    max_tokens: int


class ModelList(ResponseModel):
    """GET /v1/models (with Anthropic's page fields: one page)."""

    object: Literal["list"]
    data: list[ModelCard]
    has_more: bool
    first_id: str | None
    last_id: str | None
