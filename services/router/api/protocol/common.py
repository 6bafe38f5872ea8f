"""What the API models share: JSON-typed fields that check themselves with the gateway's 400
messages, schema-only documentation of raw JSON fields, and ValidationError -> APIError.

Every check raises a ``PydanticCustomError`` of type ``invalid_request`` carrying the exact
message and ``param``; pydantic validates fields in their declared order and ``api_error``
reports the first failure, so a model's field order is the order its checks run in. Fields
of nested shapes (turns, tools, structured outputs) are raw JSON here, documented by a
``DocModel`` and checked after the model by the request feature that reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal, TypeVar

from annotated_types import Ge, GroupedMetadata, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from services.engine.sampling_params import MAX_STOP, MAX_STOP_CHARS, MAX_TOKEN_COUNT
from services.router.errors import APIError, bad_request

M = TypeVar("M", bound="APIModel")

INVALID = "invalid_request"  # the pydantic error type of every check below


def invalid(message: str, param: str | None) -> PydanticCustomError:
    """A validation failure that becomes a 400 with exactly ``message`` and ``param``."""
    return PydanticCustomError(INVALID, "{message}", {"message": message, "param": param})


class APIModel(BaseModel):
    """A request body. Unknown fields are kept (clients send many we ignore), and a JSON
    ``null`` in a field that is not required means the field is absent."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or (k in fields and fields[k].is_required())}  # fmt: skip


class DocModel(BaseModel):
    """A nested shape, for the document only (its checker is named on the field using it)."""

    model_config = ConfigDict(extra="allow")


class Documented:
    """Annotation: the field validates as its own (raw JSON) type, and /openapi.json documents
    it as ``doc_type``, whose shape the named checker enforces with the gateway's messages."""

    def __init__(self, doc_type: Any) -> None:
        self.core = TypeAdapter(doc_type).core_schema

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> Any:
        return handler(self.core)


def api_error(exc: ValidationError) -> APIError:
    """The first failure of ``exc`` as the 400 the gateway has always sent for it."""
    err = exc.errors(include_url=False)[0]
    name = str(err["loc"][0]) if err["loc"] else None
    if err["type"] == INVALID:
        ctx = err.get("ctx") or {}
        return bad_request(ctx["message"], param=ctx.get("param"))
    if err["type"] == "missing":
        return bad_request(f"missing required field '{name}'", param=name)
    where = ".".join(str(p) for p in err["loc"])
    return bad_request(f"'{where}': {err['msg']}", param=name)


def parse(model: type[M], body: dict[str, Any], **limits: Any) -> M:
    """``body`` as ``model``, or the APIError of its first failure; ``limits`` are the
    router's configured bounds (``max_n``, ``max_tokens_limit``, ``max_prompts``)."""
    try:
        return model.model_validate(body, context=limits)
    except ValidationError as exc:
        raise api_error(exc) from None


def model_name(body: dict[str, Any]) -> str:
    """``parse(ModelTarget, body).model``: the model a request names. NOTE: a string name, the
    common case, is read without validating a ModelTarget (which copies every field of the
    body into it, ~10-15 us a request in the router); any other value gets the parse's 400."""
    name = body.get("model")
    if type(name) is str:
        return name
    return parse(ModelTarget, body).model


# -- JSON-typed fields ---------------------------------------------------------------------

_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
               dict: "object"}  # fmt: skip


def json_type(value: Any, name: str, types: tuple[type, ...]) -> Any:
    """``value`` if its JSON type is one of ``types`` (an integer is also a number, a boolean
    is not), else the 400 naming ``name``; integers come back as floats where floats are."""
    ok = isinstance(value, types)
    if isinstance(value, bool) and bool not in types:
        ok = False  # JSON true is not a number here
    elif not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
        try:
            value, ok = float(value), True
        except OverflowError:  # NOTE: JSON bounds no integer's digits (a 500 before)
            raise invalid(f"'{name}' must be a number, got an integer past a float's range "
                          "(about 1.8e308)", name) from None  # fmt: skip
    if not ok:
        got = type(value).__name__ if value is not None else "null"
        wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise invalid(f"'{name}' must be {wanted}, got {got}", name)
    return value


def _name(info: ValidationInfo) -> str:
    return info.field_name or ""


def _of(*types: type) -> BeforeValidator:
    return BeforeValidator(lambda v, info: json_type(v, _name(info), types))


Str = Annotated[str, _of(str)]
Integer = Annotated[int, _of(int)]
Bool = Annotated[bool, _of(bool)]
Object = Annotated[dict[str, Any], _of(dict)]
Array = Annotated[list[Any], _of(list)]


def _unsupported(value: bool, info: ValidationInfo) -> bool:
    if value:
        raise invalid(f"'{_name(info)}' is not supported", _name(info))
    return value


# A switch the gateway does not implement: only false is accepted.
Unsupported = Annotated[
    bool, _of(bool), AfterValidator(_unsupported), Field(json_schema_extra={"enum": [False]})
]


class _Checks(GroupedMetadata):
    """Annotations that travel together: ``Annotated[int, Int(0, 20)]``."""

    def __init__(self, *items: Any) -> None:
        self.items = items

    def __iter__(self) -> Iterator[Any]:
        yield from self.items


def Int(lo: int, hi: int | None = None, *, limit: str | None = None) -> GroupedMetadata:  # noqa: N802
    """An integer in [lo, hi]; ``limit``: the context key of a bound the router's
    configuration sets in place of ``hi`` (None or absent: ``hi``), left out of the document."""

    def check(value: Any, info: ValidationInfo) -> int:
        name = _name(info)
        value = json_type(value, name, (int,))
        top = (info.context or {}).get(limit) if limit is not None else None
        top = hi if top is None else top
        if value < lo or (top is not None and value > top):
            bound = f"[{lo}, {top}]" if top is not None else f">= {lo}"
            raise invalid(f"'{name}' must be {bound}, got {value}", name)
        return value

    top = None if limit is not None else hi
    return _Checks(*([Ge(lo)] + ([Le(top)] if top is not None else [])), BeforeValidator(check))


# A count of tokens to generate: at most the router's ``max_tokens_limit``, else the wire's
# int32 (a larger one was the engine's 400, which names no parameter).
TokenCount = Annotated[int, Int(1, MAX_TOKEN_COUNT, limit="max_tokens_limit")]
MaybeTokenCount = Annotated[int | None, Int(1, MAX_TOKEN_COUNT, limit="max_tokens_limit")]


def OneOf(*values: str) -> GroupedMetadata:  # noqa: N802
    """A string among ``values`` (documented as an enum)."""

    def check(value: Any, info: ValidationInfo) -> str:
        name = _name(info)
        if json_type(value, name, (str,)) not in values:
            raise invalid(f"'{name}' must be one of {', '.join(values)}, got {value!r}", name)
        return value

    return _Checks(BeforeValidator(check), Field(json_schema_extra={"enum": list(values)}))


def Number(lo: float, hi: float) -> GroupedMetadata:  # noqa: N802
    """A number in [lo, hi] (an integer is taken as a number)."""

    def check(value: Any, info: ValidationInfo) -> float:
        name = _name(info)
        value = json_type(value, name, (float,))
        if not lo <= value <= hi:
            raise invalid(f"'{name}' must be in [{lo}, {hi}], got {value}", name)
        return value

    return _Checks(Ge(lo), Le(hi), BeforeValidator(check))


def _stop(value: Any, info: ValidationInfo) -> list[str]:
    name = _name(info)
    value = json_type(value, name, (str, list))
    value = [value] if isinstance(value, str) else value
    if not all(isinstance(s, str) for s in value):
        raise invalid(f"'{name}' must be a string or an array of strings", name)
    if not all(value):  # NOTE: "" would match everywhere; vLLM refuses it too
        raise invalid(f"'{name}' must not contain an empty string", name)
    if len(value) > MAX_STOP:
        raise invalid(f"'{name}' holds {len(value)} strings; at most {MAX_STOP} are accepted", name)
    if (chars := sum(map(len, value))) > MAX_STOP_CHARS:
        raise invalid(f"'{name}' holds {chars} characters in all; at most {MAX_STOP_CHARS} are "
                      "accepted", name)  # fmt: skip
    return list(value)


# A stop string or strings, always a list once parsed.
Stop = Annotated[list[str], BeforeValidator(_stop), Documented(str | list[str])]


def _logit_bias(value: Any, info: ValidationInfo) -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: token ids (as strings, JSON keys being strings) to numbers
    in [-100, 100]; None when empty. Ids past the vocabulary are left to the worker, which
    knows it (also a 400)."""
    name = _name(info)
    value = json_type(value, name, (dict,))
    if not value:
        return None
    out: dict[int, float] = {}
    for key, bias in value.items():
        # NOTE: ASCII digits only (int() would take " 5", "+5", "5_0" and other scripts'
        # digits); below 2**31, what the wire's int32 holds.
        if not (key.isascii() and key.isdigit()) or int(key) >= 2**31:
            raise invalid(f"'{name}' keys must be token ids, got {key!r}", name)
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise invalid(f"'{name}' values must be numbers in [-100, 100], got "
                          f"{json.dumps(bias)} for token {key}", name)  # fmt: skip
        out[int(key)] = float(bias)
    return out


# Token id (a string of digits) -> a bias added to its logit before sampling.
LogitBias = Annotated[
    dict[int, float] | None,
    BeforeValidator(_logit_bias),
    WithJsonSchema({"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}),
]  # fmt: skip


def IntList(max_items: int, lo: int, hi: int) -> GroupedMetadata:  # noqa: N802
    """An array of integers; its length and range are documented here and checked by
    SamplingParams (the engine's own bounds, with their messages)."""

    def check(value: Any, info: ValidationInfo) -> list[int]:
        name = _name(info)
        value = json_type(value, name, (list,))
        if not all(isinstance(t, int) for t in value):
            raise invalid(f"'{name}' must be an array of integers", name)
        return list(value)

    item = Annotated[int, Field(ge=lo, le=hi)]
    doc = Annotated[list[item], Field(max_length=max_items)]  # type: ignore[valid-type]
    return _Checks(BeforeValidator(check), Documented(doc))


def Turns(turn: type[BaseModel], empty: str, param: str | None) -> GroupedMetadata:  # noqa: N802
    """A conversation: a non-empty array (``empty``: the 400 otherwise), documented as of
    ``turn``; each turn is checked when the prompt is built."""

    def check(value: Any) -> list[Any]:
        value = json_type(value, "messages", (list,))
        if not value:
            raise invalid(empty, param)
        return value

    return _Checks(BeforeValidator(check), Documented(Annotated[list[turn], Field(min_length=1)]))  # type: ignore[valid-type]


class ModelTarget(APIModel):
    """What a request names before the rest is checked: the model it is for."""

    model: Str


# -- Responses ------------------------------------------------------------------------------


class ResponseModel(BaseModel):
    """A response body: exactly these fields (tests validate what the gateway sends)."""

    model_config = ConfigDict(extra="forbid")


# -- Error bodies --------------------------------------------------------------------------


class OpenAIErrorDetail(ResponseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(ResponseModel):
    """An error in OpenAI's format (every endpoint but /v1/messages*)."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(ResponseModel):
    type: str
    message: str


class AnthropicError(ResponseModel):
    """An error in Anthropic's format (/v1/messages and /v1/messages/count_tokens)."""

    type: Literal["error"]
    error: AnthropicErrorDetail
