"""Anthropic's /v1/messages and /v1/messages/count_tokens bodies (field order: see openai.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from services.engine.sampling_params import MAX_TOP_K, SamplingParams, StructuredOutputsParams
from services.router.api.protocol.common import (
    APIModel,
    Bool,
    DocModel,
    Documented,
    Int,
    Integer,
    MaybeTokenCount,
    ModelTarget,
    Number,
    OneOf,
    ResponseModel,
    Stop,
    Str,
    TokenCount,
    Turns,
    invalid,
)
from services.router.api.protocol.openai import TextPart, ToolName
from services.router.errors import bad_request
from services.router.tiers import ANTHROPIC_REQUEST_TIERS

# -- Shapes of nested fields (documentation; checked by the feature that reads them) --------


MediaType = Literal["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"]


class Base64Source(DocModel):
    type: Literal["base64"]
    media_type: MediaType
    data: Annotated[str, Field(json_schema_extra={"contentEncoding": "base64"})]


class URLSource(DocModel):
    type: Literal["url"]
    url: str


class ImageBlock(DocModel):
    type: Literal["image"]
    source: Base64Source | URLSource


class ToolUseBlock(DocModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(DocModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextPart] | None = None
    is_error: bool | None = None


class ThinkingBlock(DocModel):
    """Earlier reasoning a client sends back in an assistant turn: left out of the prompt."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


Block = TextPart | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock


class InputMessage(DocModel):
    """A turn (services/router/api/anthropic.py parse_messages checks it)."""

    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(DocModel):
    """A custom tool (services/router/features/tools.py anthropic_tools checks it)."""

    name: ToolName
    description: str | None = None
    input_schema: dict[str, Any]  # a JSON Schema of an object


class AnthropicToolChoice(DocModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(DocModel):
    """Structured outputs (services/router/features/structured.py checks it)."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(DocModel):
    format: OutputFormat | None = None


class ThinkingConfig(DocModel):
    """Extended thinking, checked as Anthropic checks it. The model's reasoning comes back as
    thinking blocks where the router has a --reasoning-parser, whatever this says."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None  # "enabled": >= 1024 and below max_tokens


class RequestMetadata(DocModel):
    user_id: str | None = None


# -- Requests ---------------------------------------------------------------------------------


class _Prompt(APIModel):
    """What makes the prompt: tools, the system prompt and the turns."""

    tools: Annotated[Any, Documented(list[AnthropicTool])] = None
    tool_choice: Annotated[Any, Documented(AnthropicToolChoice)] = None
    system: Annotated[Any, Documented(str | list[TextPart])] = None
    messages: Annotated[
        list[Any], Turns(InputMessage, "messages: at least one message is required", None)
    ]


class MessagesTarget(APIModel):
    """What is checked before the model is looked up."""

    max_tokens: Integer
    model: Str


class MessagesSampling(APIModel):
    """The sampling fields of a Messages request."""

    max_tokens: MaybeTokenCount = None
    temperature: Annotated[float, Number(0.0, 1.0)] = 1.0
    top_p: Annotated[float, Number(0.0, 1.0)] = 1.0
    top_k: Annotated[int, Int(-1, MAX_TOP_K)] = -1
    stop_sequences: Stop = []
    # Structured outputs: output_config.format (GA) or the beta's output_format.
    output_config: Annotated[Any, Documented(OutputConfig)] = None
    output_format: Annotated[Any, Documented(OutputFormat)] = None
    # "auto" (the API key's default), "standard_only" (never priority); epdserve extensions:
    # "priority" (up to the key's highest tier) and "flex" (offline). See router/tiers.py.
    service_tier: Annotated[str | None, OneOf(*ANTHROPIC_REQUEST_TIERS)] = None
    # epdserve extension, as on the OpenAI APIs: false turns speculative decoding off for
    # this request (same output, its cost).
    speculative: Bool = True

    def sampling_params(self, structured: StructuredOutputsParams | None) -> SamplingParams:
        """The engine's parameters; its own checks are 400s too."""
        try:
            return SamplingParams(
                max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=self.top_k or -1, stop=self.stop_sequences, structured_outputs=structured,
                speculative=self.speculative,
            )  # fmt: skip
        except ValueError as exc:
            raise bad_request(str(exc)) from None


class _Head(MessagesTarget):
    stream: Bool = False


class MessagesRequest(_Prompt, MessagesSampling, _Head):
    """POST /v1/messages."""

    max_tokens: TokenCount  # required here
    thinking: Annotated[Any, Documented(ThinkingConfig)] = None
    metadata: Annotated[Any, Documented(RequestMetadata)] = None

    @model_validator(mode="after")
    def _thinking_and_metadata(self) -> MessagesRequest:
        """Anthropic's 400s for a malformed ``thinking`` or ``metadata`` (they were taken
        silently)."""
        t = self.thinking
        if t is not None:
            if not isinstance(t, dict) or t.get("type") not in ("enabled", "disabled", "adaptive"):
                raise invalid("thinking.type: must be 'enabled', 'disabled' or 'adaptive'",
                              "thinking")  # fmt: skip
            budget = t.get("budget_tokens")
            if t["type"] == "enabled":
                if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1024:
                    raise invalid("thinking.enabled.budget_tokens: must be an integer >= 1024",
                                  "thinking")  # fmt: skip
                if budget >= self.max_tokens:
                    raise invalid("`max_tokens` must be greater than `thinking.budget_tokens`",
                                  "max_tokens")  # fmt: skip
        m = self.metadata
        if m is not None and (not isinstance(m, dict) or set(m) - {"user_id"}
                              or not isinstance(m.get("user_id"), str | None)):  # fmt: skip
            raise invalid("metadata: an object whose only field is 'user_id', a string",
                          "metadata")  # fmt: skip
        return self


class CountTokensRequest(_Prompt, ModelTarget):
    """POST /v1/messages/count_tokens: the prompt fields of a Messages request."""


# -- Responses --------------------------------------------------------------------------------


class TextContent(ResponseModel):
    type: Literal["text"]
    text: str


class ThinkingContent(ResponseModel):
    type: Literal["thinking"]
    thinking: str
    signature: str


class ToolUseContent(ResponseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(ResponseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    service_tier: Literal["standard", "priority", "batch"]  # the tier that served it


class MessageResponse(ResponseModel):
    """A whole message (stream=false)."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextContent | ThinkingContent | ToolUseContent]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: MessageUsage


class CountTokensResponse(ResponseModel):
    input_tokens: int
