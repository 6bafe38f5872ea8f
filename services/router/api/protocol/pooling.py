"""Bodies of the pooling APIs: OpenAI's /v1/embeddings, the Jina/Cohere /v1/rerank (and
/v2/rerank) and vLLM's /v1/score, as vLLM serves them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo

from services.router.api.protocol.common import (
    APIModel,
    Bool,
    Documented,
    Int,
    ResponseModel,
    Str,
    _name,
    invalid,
    json_type,
)

_TOKEN = Annotated[int, Field(ge=0)]
# The wire's uint32 (PoolRequest.dimensions); the worker checks it against the model's size.
MAX_DIMENSIONS = 2**32 - 1


def _input(value: Any, info: ValidationInfo) -> list[str] | list[list[int]]:
    """OpenAI's embeddings ``input``: a string, strings, token ids or lists of token ids; as
    a list of strings or of token-id lists, never empty, at most ``max_inputs`` items."""
    name = _name(info)
    value = json_type(value, name, (str, list))
    if isinstance(value, str):
        value = [value]
    elif value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not value:
        raise invalid(f"'{name}' must not be empty", name)
    strings = all(isinstance(v, str) for v in value)
    ids = all(
        isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        for v in value
    )
    if not strings and not ids:
        raise invalid(
            f"'{name}' must be a string, an array of strings, an array of token ids or an "
            "array of arrays of token ids", name,
        )  # fmt: skip
    if any(len(v) == 0 for v in value):
        raise invalid(f"'{name}' must not contain an empty input", name)
    limit = (info.context or {}).get("max_inputs")
    if limit is not None and len(value) > limit:
        raise invalid(f"'{name}' has {len(value)} inputs, more than the limit of {limit} "
                      "(the router's --max-pooling-inputs)", name)  # fmt: skip
    return value


def _texts(value: Any, info: ValidationInfo) -> list[str]:
    """One text or a non-empty array of texts (a rerank document may be ``{"text": ...}``,
    as Cohere's)."""
    name = _name(info)
    value = json_type(value, name, (str, list))
    items = [value] if isinstance(value, str) else value
    out = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise invalid(f"'{name}' must be a string or an array of strings", name)
        out.append(item)
    if not out:
        raise invalid(f"'{name}' must not be empty", name)
    limit = (info.context or {}).get("max_inputs")
    if limit is not None and len(out) > limit:
        raise invalid(f"'{name}' has {len(out)} items, more than the limit of {limit} "
                      "(the router's --max-pooling-inputs)", name)  # fmt: skip
    return out


def _encoding(value: Any, info: ValidationInfo) -> str:
    value = json_type(value, "encoding_format", (str,))
    if value not in ("float", "base64"):
        raise invalid(f"'encoding_format' must be 'float' or 'base64', got {value!r}",
                      "encoding_format")  # fmt: skip
    return str(value)


# vLLM's truncate_prompt_tokens: keep the last k tokens of each input (-1: the context length).
Truncate = Annotated[int, Int(-1)] | None

EmbeddingInput = Annotated[
    list[Any],
    BeforeValidator(_input),
    Documented(str | list[str] | list[_TOKEN] | list[list[_TOKEN]]),
]
Texts = Annotated[list[str], BeforeValidator(_texts), Documented(str | list[str])]


class EmbeddingRequest(APIModel):
    """POST /v1/embeddings (OpenAI)."""

    model: Str
    input: EmbeddingInput
    # Matryoshka: the first ``dimensions`` values of each embedding, renormalised.
    dimensions: Annotated[int, Int(1, MAX_DIMENSIONS)] | None = None
    encoding_format: Annotated[
        str, BeforeValidator(_encoding), Field(json_schema_extra={"enum": ["float", "base64"]})
    ] = "float"
    user: Str | None = None
    truncate_prompt_tokens: Truncate = None


class RerankRequest(APIModel):
    """POST /v1/rerank, /v2/rerank (Jina / Cohere, as vLLM): documents by relevance."""

    model: Str
    query: Str
    documents: Annotated[
        list[str],
        BeforeValidator(_texts),
        Documented(list[str] | list[dict[str, str]]),
    ]
    top_n: Annotated[int, Int(0)] | None = None  # 0 or absent: every document
    return_documents: Bool = True
    truncate_prompt_tokens: Truncate = None


class ScoreRequest(APIModel):
    """POST /v1/score (vLLM): a score per pair; one ``text_1`` goes with every ``text_2``,
    else the two lists pair up item by item."""

    model: Str
    text_1: Texts
    text_2: Texts
    truncate_prompt_tokens: Truncate = None


# -- responses ------------------------------------------------------------------------------


class PoolingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(ResponseModel):
    object: Literal["embedding"]
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format=base64
    index: int


class EmbeddingResponse(ResponseModel):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: PoolingUsage


class RerankDocument(ResponseModel):
    text: str


class RerankResult(ResponseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None  # with return_documents


class RerankUsage(ResponseModel):
    total_tokens: int


class RerankResponse(ResponseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]  # best first


class ScoreData(ResponseModel):
    index: int
    object: Literal["score"]
    score: float


class ScoreResponse(ResponseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[ScoreData]
    usage: PoolingUsage
