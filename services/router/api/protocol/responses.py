"""OpenAI's /v1/responses bodies (field order: see openai.py): the request, the stored
response object and the deletion answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from services.router.api.protocol.common import (
    Bool,
    DocModel,
    Documented,
    Int,
    MaybeTokenCount,
    ModelTarget,
    Number,
    ResponseModel,
    invalid,
    json_type,
)
from services.router.api.protocol.openai import ToolName

# -- Shapes of nested fields (documentation; api/responses_input.py checks them) ------------


class InputText(DocModel):
    type: Literal["input_text", "output_text"]
    text: str


class InputImage(DocModel):
    type: Literal["input_image"]
    image_url: str  # a data: URL (base64) or an http(s) URL the router fetches
    detail: Literal["low", "high", "auto"] | None = None


class ResponseInputMessage(DocModel):
    """A turn; ``type`` may be left out."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText | InputImage]


class FunctionCallInput(DocModel):
    """A call the model made earlier, sent back with its output."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # a JSON object, as text
    id: str | None = None


class FunctionCallOutputInput(DocModel):
    """The result of a call (``call_id``), for the model to go on from."""

    type: Literal["function_call_output"]
    call_id: str
    output: str


class ReasoningInput(DocModel):
    """Earlier reasoning sent back: left out of the prompt."""

    type: Literal["reasoning"]


InputItem = ResponseInputMessage | FunctionCallInput | FunctionCallOutputInput | ReasoningInput


class FunctionTool(DocModel):
    """A function the model may call (api/responses_input.py checks it)."""

    type: Literal["function"]
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of an object
    strict: bool | None = None


class ResponsesToolChoice(DocModel):
    type: Literal["function"]
    name: str


class TextFormat(DocModel):
    """Structured outputs: ``json_schema`` needs ``schema``."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(DocModel):
    format: TextFormat | None = None


class ReasoningConfig(DocModel):
    """Accepted; the effort is the model's own (a reasoning parser splits what it writes)."""

    effort: str | None = None
    summary: str | None = None


# -- Requests ---------------------------------------------------------------------------------

_UNSUPPORTED = {
    "conversation": "'conversation' is not supported (no Conversations API): continue a "
    "conversation with 'previous_response_id', or send its turns in 'input'",
    "prompt": "'prompt' (a stored prompt template) is not supported: send 'input' and "
    "'instructions'",
    "truncation": "'truncation' must be 'disabled': 'auto' is not supported (a prompt over the "
    "context is a 400, never cut)",
}


class ResponsesRequest(ModelTarget):
    """POST /v1/responses. vLLM's sampling extensions (``top_k``, ``seed``, ``stop``,
    ``ignore_eos``, ...: responses_input.EXTRA_SAMPLING) are accepted and checked as in a
    chat completion."""

    # Sent by the SDK when asked for, not supported here: a 400 naming the field (served
    # without it, a conversation's earlier turns or a stored prompt were silently missing).
    conversation: Annotated[Any, Documented(str)] = None
    prompt: Annotated[Any, Documented(dict[str, Any])] = None
    truncation: Annotated[Any, Documented(Literal["disabled"])] = None
    stream: Bool = False
    background: Bool = False
    store: Bool = True
    previous_response_id: Annotated[str | None, Documented(str)] = None
    instructions: Annotated[str | None, Documented(str)] = None
    input: Annotated[Any, Documented(str | Annotated[list[InputItem], Field(min_length=1)])]
    max_output_tokens: MaybeTokenCount = None
    temperature: Annotated[float, Number(0.0, 2.0)] = 1.0
    top_p: Annotated[float, Number(0.0, 1.0)] = 1.0
    tools: Annotated[Any, Documented(list[FunctionTool])] = None
    tool_choice: Annotated[
        Any, Documented(Literal["none", "auto", "required"] | ResponsesToolChoice)
    ] = None
    parallel_tool_calls: Bool = True
    text: Annotated[Any, Documented(TextConfig)] = None
    reasoning: Annotated[Any, Documented(ReasoningConfig)] = None
    metadata: Annotated[Any, Documented(dict[str, str])] = None
    # Logprobs of the output text: "message.output_text.logprobs" in ``include``, or
    # ``top_logprobs`` (alternatives per token).
    include: Annotated[Any, Documented(list[str])] = None
    top_logprobs: Annotated[int | None, Int(0, 20)] = None

    @property
    def logprobs(self) -> bool:
        include = self.include if isinstance(self.include, list) else []
        return self.top_logprobs is not None or "message.output_text.logprobs" in include

    @field_validator("conversation", "prompt", "truncation", mode="before")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        if name == "truncation" and value == "disabled":
            return value
        raise invalid(_UNSUPPORTED[name], name)

    @field_validator("previous_response_id", "instructions", mode="before")
    @classmethod
    def _string(cls, value: Any, info: ValidationInfo) -> Any:
        return json_type(value, info.field_name or "", (str,))

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        """A string, or a non-empty array of items (each checked when the prompt is built)."""
        value = json_type(value, "input", (str, list))
        if isinstance(value, list) and not value:
            raise invalid("'input' must not be empty", "input")
        return value


# -- Responses --------------------------------------------------------------------------------


class OutputText(ResponseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[dict[str, Any]]  # with "message.output_text.logprobs" / top_logprobs


class OutputMessage(ResponseModel):
    type: Literal["message"]
    id: str
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallOutput(ResponseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ReasoningText(ResponseModel):
    type: Literal["reasoning_text"]
    text: str


class ReasoningOutput(ResponseModel):
    type: Literal["reasoning"]
    id: str
    summary: list[Any]
    content: list[ReasoningText]
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(ResponseModel):
    cached_tokens: int
    cache_write_tokens: int


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int


class ResponseUsage(ResponseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseErrorDetail(ResponseModel):
    code: str
    message: str


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(ResponseModel):
    """A response (POST, GET /v1/responses/{id}, and the events that carry it)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    background: bool
    error: ResponseErrorDetail | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage | FunctionCallOutput | ReasoningOutput]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: dict[str, Any] | None
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["disabled"]
    usage: ResponseUsage | None
    metadata: dict[str, str]
    service_tier: Literal["default", "flex", "priority"]  # the tier that served it


class ResponseDeleted(ResponseModel):
    """DELETE /v1/responses/{id}."""

    id: str
    object: Literal["response"]
    deleted: Literal[True]


class InputItemList(ResponseModel):
    """GET /v1/responses/{id}/input_items."""

    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
