"""OpenAI's /v1/chat/completions and /v1/completions bodies (plus vLLM's extensions).

Fields are declared in the order the gateway checks them (the first failure is the 400);
a model's bases contribute their fields first, last base first.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from services.engine.sampling_params import (
    MAX_STOP,
    MAX_TOKEN_COUNT,
    MAX_TOKEN_ID,
    MAX_TOP_K,
    REPETITION_PENALTY_RANGE,
    SamplingParams,
    StructuredOutputsParams,
)
from services.engine.service_tiers import MAX_PRIORITY, MIN_PRIORITY
from services.router.api.protocol.common import (
    APIModel,
    Bool,
    DocModel,
    Documented,
    Int,
    IntList,
    LogitBias,
    MaybeTokenCount,
    ModelTarget,
    Number,
    Object,
    OneOf,
    Stop,
    Str,
    Turns,
    Unsupported,
    invalid,
    json_type,
)
from services.router.errors import bad_request
from services.router.tiers import OPENAI_REQUEST_TIERS

# -- Shapes of nested fields (documentation; checked by the feature that reads them) --------


class TextPart(DocModel):
    type: Literal["text"]
    text: str


class ImageURL(DocModel):
    url: str  # a data: URL (base64) or an http(s) URL the router fetches
    detail: str | None = None


class ImageURLPart(DocModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ToolCallFunction(DocModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(DocModel):
    id: str | None = None
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(DocModel):
    """A chat turn (services/router/api/openai.py chat_messages checks it)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart | ImageURLPart] | None = None  # required but of an assistant
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


ToolName = Annotated[str, Field(pattern="^[A-Za-z0-9_.:-]{1,128}$")]


class FunctionDef(DocModel):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of an object


class Tool(DocModel):
    """A function the model may call (services/router/features/tools.py openai_tools checks it)."""

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(DocModel):
    name: str


class ToolChoiceFunction(DocModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceFunction


class StreamOptions(DocModel):
    include_usage: bool | None = None


class JSONSchemaFormat(DocModel):
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(DocModel):
    """Structured outputs, OpenAI's way (services/router/features/structured.py checks it)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


Choices = Annotated[list[str], Field(min_length=1)]


class StructuredOutputs(DocModel):
    """Structured outputs, vLLM's way: one constraint per request."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = None


# -- Requests ---------------------------------------------------------------------------------


class _Stream(ModelTarget):
    stream: Bool = False
    stream_options: Annotated[Object | None, Documented(StreamOptions)] = None


class _Sampling(APIModel):
    """The sampling fields both endpoints share (vLLM-style extensions included)."""

    stop_token_ids: Annotated[list[int], IntList(MAX_STOP, 0, MAX_TOKEN_ID)] = []
    response_format: Annotated[Any, Documented(ResponseFormat)] = None
    structured_outputs: Annotated[Any, Documented(StructuredOutputs)] = None
    guided_json: Annotated[Any, Documented(dict[str, Any] | str)] = None
    guided_regex: Annotated[Any, Documented(str)] = None
    guided_choice: Annotated[Any, Documented(Choices)] = None
    guided_grammar: Annotated[Any, Documented(str)] = None
    n: Annotated[int, Int(1, 64, limit="max_n")] = 1
    # OpenAI's "generate best_of, return the n best": not done here, so only best_of == n.
    best_of: Annotated[int | None, Int(1, 64, limit="max_n")] = None
    temperature: Annotated[float, Number(0.0, 2.0)] = 1.0
    top_p: Annotated[float, Number(0.0, 1.0)] = 1.0
    top_k: Annotated[int, Int(-1, MAX_TOP_K)] = -1  # 0 also means "no top-k"
    min_p: Annotated[float, Number(0.0, 1.0)] = 0.0
    seed: Annotated[int | None, Int(-(2**63), 2**63 - 1)] = None
    presence_penalty: Annotated[float, Number(-2.0, 2.0)] = 0.0
    frequency_penalty: Annotated[float, Number(-2.0, 2.0)] = 0.0
    repetition_penalty: Annotated[float, Number(*REPETITION_PENALTY_RANGE)] = 1.0
    min_tokens: Annotated[int, Int(0, MAX_TOKEN_COUNT)] = 0
    stop: Stop = []
    ignore_eos: Bool = False
    include_stop_str_in_output: Bool = False
    skip_special_tokens: Bool = True
    logit_bias: LogitBias = None
    # "auto" (the API key's default), "default" (online), "flex" (offline), "priority".
    service_tier: Annotated[str | None, OneOf(*OPENAI_REQUEST_TIERS)] = None
    priority: Annotated[int, Int(MIN_PRIORITY, MAX_PRIORITY)] = 0  # vLLM's: lower runs first
    speculative: Bool = True  # false: no speculative decoding for it (same output, its cost)
    user: Str | None = None  # OpenAI's end-user id: checked, not used
    # vLLM's log-probabilities of the prompt's tokens: not computed here, so only null is
    # accepted (an answer without them, silently, was the alternative).
    prompt_logprobs: Annotated[int | None, Documented(int)] = None

    @field_validator("prompt_logprobs", mode="before")
    @classmethod
    def _prompt_logprobs(cls, value: Any) -> None:
        raise invalid("'prompt_logprobs' is not supported: the prompt's log-probabilities are "
                      "not computed", "prompt_logprobs")  # fmt: skip

    @field_validator("best_of", mode="after")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise invalid(f"'best_of' must equal 'n' ({n}), got {value}: choosing the best "
                          "of more sequences than are returned is not supported", "best_of")  # fmt: skip
        return value

    def _params(self, max_tokens: int | None, logprobs: int | None,
                structured: StructuredOutputsParams | None) -> SamplingParams:  # fmt: skip
        """The engine's SamplingParams; its own checks (counts, ranges) are 400s too."""
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise bad_request(f"'min_tokens' must be <= the most tokens to generate "
                              f"({max_tokens}), got {self.min_tokens}", param="min_tokens")  # fmt: skip
        try:
            return SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p,
                top_k=self.top_k or -1, min_p=self.min_p, seed=self.seed,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, max_tokens=max_tokens,
                min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, logprobs=logprobs,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens, structured_outputs=structured,
                logit_bias=self.logit_bias, priority=self.priority, speculative=self.speculative,
            )  # fmt: skip
        except ValueError as exc:
            raise bad_request(str(exc)) from None


class _ChatLimits(APIModel):
    max_completion_tokens: MaybeTokenCount = None
    max_tokens: MaybeTokenCount = None
    logprobs: Bool = False
    top_logprobs: Annotated[int | None, Int(0, 20)] = None

    @field_validator("max_tokens", mode="wrap")
    @classmethod
    def _superseded(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        """``max_tokens`` is not read (nor checked) when ``max_completion_tokens`` is given."""
        return None if info.data.get("max_completion_tokens") is not None else handler(value)

    @field_validator("top_logprobs", mode="after")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return value


# The arguments of the templates' rendering that the gateway sets (transformers'
# apply_chat_template and render_jinja_template, and "self", which the methods that pass them
# on take: a TypeError, a 500 or a 400 naming messages): a request's chat_template_kwargs may
# not set them.
TEMPLATE_ARGUMENTS = frozenset({
    "self", "messages", "conversation", "conversations", "tools", "documents", "chat_template",
    "add_generation_prompt", "continue_final_message", "tokenize", "sanitize_control_tokens",
    "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})  # fmt: skip


class ChatPrompt(APIModel):
    """What makes a chat's prompt: tools and the turns (also /tokenize's)."""

    # vLLM's request-supplied template, which it refuses unless its server trusts request
    # templates: the model's own template always renders here (the field was ignored).
    chat_template: Annotated[str | None, Documented(str)] = None

    @field_validator("chat_template", mode="before")
    @classmethod
    def _chat_template(cls, value: Any) -> None:
        raise invalid("'chat_template' is not supported: the model's own chat template renders "
                      "every chat (a template passed with a request is not trusted)",
                      "chat_template")  # fmt: skip

    # vLLM's: variables for the chat template (Qwen3's enable_thinking, ...), beside the ones
    # the gateway sets.
    chat_template_kwargs: Object | None = None

    @field_validator("chat_template_kwargs", mode="after")
    @classmethod
    def _template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(set(value or {}) & TEMPLATE_ARGUMENTS)
        if taken:
            raise invalid(f"'chat_template_kwargs' may not set {', '.join(taken)}: the gateway "
                          "sets them", "chat_template_kwargs")  # fmt: skip
        return value

    tools: Annotated[Any, Documented(list[Tool])] = None
    tool_choice: Annotated[Any, Documented(ToolChoice)] = None
    parallel_tool_calls: Annotated[Any, Documented(bool)] = None
    messages: Annotated[list[Any], Turns(ChatMessage, "'messages' must not be empty", "messages")]


class ChatSampling(_Sampling, _ChatLimits):
    """A chat's sampling fields."""

    def sampling_params(self, structured: StructuredOutputsParams | None,
                        max_tokens_limit: int | None = None) -> SamplingParams:  # fmt: skip
        """The engine's parameters; without a bound, at most the router's limit, if any."""
        max_tokens = self.max_completion_tokens or self.max_tokens or max_tokens_limit
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(max_tokens, logprobs, structured)


class ChatCompletionRequest(ChatPrompt, ChatSampling, _Stream):
    """POST /v1/chat/completions."""

    # vLLM's: false renders no assistant header after the last turn (as /tokenize's).
    add_generation_prompt: Bool = True
    continue_final_message: Unsupported = False  # as /tokenize's


class _CompletionLimits(APIModel):
    max_tokens: MaybeTokenCount = None
    logprobs: Annotated[int | None, Int(0, 20)] = None


TokenIds = list[Annotated[int, Field(ge=0)]]
Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[TokenIds, Field(min_length=1)]
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionSampling(_Sampling, _CompletionLimits):
    """A completion's sampling fields."""

    def sampling_params(self, structured: StructuredOutputsParams | None,
                        max_tokens_limit: int | None = None) -> SamplingParams:  # fmt: skip
        """The engine's parameters; 16 tokens (or the router's limit) without ``max_tokens``."""
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = min(16, max_tokens_limit or 16)
        return self._params(max_tokens, self.logprobs, structured)


class _CompletionStream(_Stream):
    echo: Bool = False  # the prompt's text before each choice's (not with logprobs)
    # Fill-in-the-middle needs a model's FIM template, which no served model declares (vLLM
    # refuses it likewise): only null is accepted.
    suffix: Annotated[str | None, Documented(str)] = None

    @field_validator("suffix", mode="before")
    @classmethod
    def _suffix(cls, value: Any) -> None:
        raise invalid("'suffix' is not supported: no fill-in-the-middle template", "suffix")


class CompletionRequest(CompletionSampling, _CompletionStream):
    """POST /v1/completions."""

    prompt: Annotated[Any, Documented(Prompt)]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any, info: ValidationInfo) -> Any:
        """A string, or a non-empty array of strings, of token ids or of arrays of token ids
        (at most ``max_prompts`` prompts); the ids are checked against the vocabulary later."""
        value = json_type(value, "prompt", (str, list))
        if isinstance(value, str):
            return value
        if not value:
            raise invalid("'prompt' must not be empty", "prompt")
        most = (info.context or {}).get("max_prompts")
        if most is not None and isinstance(value[0], (str, list)) and len(value) > most:
            raise invalid(f"'prompt' holds {len(value)} prompts; at most {most} are accepted",
                          "prompt")  # fmt: skip
        if (
            all(isinstance(t, int) and not isinstance(t, bool) for t in value)
            or all(isinstance(p, str) for p in value)
            or all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in value)
        ):
            return value  # fmt: skip
        raise invalid("'prompt' must be a string, an array of strings or of token ids", "prompt")
