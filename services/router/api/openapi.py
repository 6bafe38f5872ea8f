"""The gateway's OpenAPI 3.1 document, served at /openapi.json, generated from the API models
(services/router/api/protocol/) that validate the requests, so the two cannot drift."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from services.router.api.protocol.anthropic import (
    CountTokensRequest,
    CountTokensResponse,
    MessageResponse,
    MessagesRequest,
)
from services.router.api.protocol.batches import (
    BatchCreateRequest,
    BatchList,
    BatchObject,
    FileDeleted,
    FileList,
    FileObject,
    MessageBatch,
    MessageBatchCreateRequest,
    MessageBatchList,
)
from services.router.api.protocol.common import AnthropicError, OpenAIError
from services.router.api.protocol.openai import ChatCompletionRequest, CompletionRequest
from services.router.api.protocol.openai_replies import (
    ChatCompletion,
    Completion,
    ModelCard,
    ModelList,
)
from services.router.api.protocol.pooling import (
    EmbeddingRequest,
    EmbeddingResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
)
from services.router.api.protocol.responses import (
    InputItemList,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
)
from services.router.api.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

_REF = "#/components/schemas/{model}"


class _Schema(GenerateJsonSchema):
    """pydantic's JSON Schema, less noise: no per-field titles, and an optional field (None
    by default) documented as its type alone, since ``null`` there means "absent"."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        out = super().default_schema(schema)
        if "default" not in schema or schema["default"] is not None:
            return out
        out.pop("default", None)
        branches = [b for b in out.get("anyOf", []) if b != {"type": "null"}]
        if len(branches) == 1:
            del out["anyOf"]
            out.update(branches[0])
        elif branches:
            out["anyOf"] = branches
        return out


_MODEL_ID = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
_MODELS: list[type[BaseModel]] = [
    ChatCompletionRequest, CompletionRequest, MessagesRequest, CountTokensRequest,
    TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest,
    ChatCompletion, Completion, MessageResponse, CountTokensResponse, TokenizeResponse,
    DetokenizeResponse, ModelCard, ModelList, OpenAIError, AnthropicError, ResponsesRequest,
    ResponseObject, ResponseDeleted, EmbeddingRequest, EmbeddingResponse, RerankRequest,
    RerankResponse, ScoreRequest, ScoreResponse, BatchCreateRequest, MessageBatchCreateRequest,
    FileObject, FileList, FileDeleted, BatchObject, BatchList, MessageBatch, MessageBatchList,
]  # fmt: skip


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(error: type[BaseModel], *, generates: bool) -> dict[str, Any]:
    """Error responses; a tokenizer-only endpoint generates nothing, so has no 429 / 504."""
    schema = _ref(error)
    out = {
        "400": _json(schema, "invalid request"),
        "401": _json(schema, "missing or wrong API key"),
        "404": _json(schema, "unknown model"),
        "413": _json(schema, "request body too large"),
        "429": _json(schema, "too many queued prompt tokens; see Retry-After"),
        "503": _json(schema, "no worker can serve the model"),
        "504": _json(schema, "the generation timed out"),
    }
    return out if generates else {k: v for k, v in out.items() if k not in ("429", "504")}


def _post(summary: str, request: dict[str, Any], ok: dict[str, Any],
          error: type[BaseModel], *, generates: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}, {"apiKey": []}],
            "requestBody": {
                "required": True, "content": {"application/json": {"schema": request}},
            },
            "responses": {"200": ok, **_errors(error, generates=generates)},
        }
    }  # fmt: skip


def _pooled(summary: str, request: type[BaseModel], ok: type[BaseModel]) -> dict[str, Any]:
    """A pooling endpoint: queued like generation (429), run by a worker (504)."""
    return _post(summary, _ref(request), _json(_ref(ok), "the result"), OpenAIError,
                 generates=True)  # fmt: skip


def _generated(response: type[BaseModel]) -> dict[str, Any]:
    return {
        "description": "the result (JSON), or server-sent events with stream=true",
        "content": {"application/json": {"schema": _ref(response)},
                    "text/event-stream": {"schema": {"type": "string"}}},
    }  # fmt: skip


_PAGE = [
    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
    {"name": "after", "in": "query", "schema": {"type": "string"}},
]


def _stored(
    method: str, summary: str, ok: type[BaseModel], query: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An operation on a stored response, named by the path's ``response_id``."""
    errors = {k: _json(_ref(OpenAIError), d) for k, d in (
        ("400", "not a background response (cancel)"), ("401", "missing or wrong API key"),
        ("404", "no stored response with this id (never stored, expired or deleted)"),
        ("503", "the response store (etcd) is unavailable"),
    )}  # fmt: skip
    return {
        method: {
            "summary": summary,
            "security": [{"bearer": []}, {"apiKey": []}],
            "parameters": [{"name": "response_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}, *(query or [])],
            "responses": {"200": _json(_ref(ok), "the result"), **errors},
        }
    }  # fmt: skip


def _batch_op(method: str, summary: str, ok: dict[str, Any], error: type[BaseModel], *,
              path_id: str | None = None, query: list[dict[str, Any]] | None = None,
              body: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """An operation of the Files / Batch APIs: on a stored object named by the path's
    ``path_id``, or on the collection."""
    errors = {k: _json(_ref(error), d) for k, d in (
        ("400", "invalid request (a bad line of the file: its number and the reason)"),
        ("401", "missing or wrong API key"),
        ("404", "no such file or batch (or another API key's)"),
        ("413", "request body too large"), ("503", "the batch store (etcd) is unavailable"),
    )}  # fmt: skip
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}, {"apiKey": []}],
        "parameters": [*([{"name": path_id, "in": "path", "required": True,
                           "schema": {"type": "string"}}] if path_id else []), *(query or [])],
        "responses": {"200": ok, **errors},
    }  # fmt: skip
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    return {method: op}


def _batch_paths() -> dict[str, Any]:
    """The OpenAI Files and Batch APIs and Anthropic's Message Batches (api/batches.py,
    api/message_batches.py)."""
    o, a = OpenAIError, AnthropicError
    upload = {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "purpose": {"type": "string", "enum": ["batch"]}},
    }}}  # fmt: skip
    jsonl = {"description": "the file's bytes (JSONL)",
             "content": {"application/octet-stream": {"schema": {"type": "string"}}}}  # fmt: skip
    after = [{"name": "after", "in": "query", "schema": {"type": "string"}},
             {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}]  # fmt: skip
    return {
        "/v1/files": {
            **_batch_op("post", "upload a batch input file (JSONL, purpose=batch)",
                        _json(_ref(FileObject), "the file object"), o, body=upload),
            **_batch_op("get", "the files of this API key", _json(_ref(FileList), "a page"), o,
                        query=[*after, {"name": "order", "in": "query",
                                        "schema": {"enum": ["asc", "desc"]}},
                               {"name": "purpose", "in": "query",
                                "schema": {"type": "string"}}]),
        },
        "/v1/files/{file_id}": {
            **_batch_op("get", "a file object", _json(_ref(FileObject), "the file object"), o,
                        path_id="file_id"),
            **_batch_op("delete", "delete a file", _json(_ref(FileDeleted), "deleted"), o,
                        path_id="file_id"),
        },
        "/v1/files/{file_id}/content": _batch_op("get", "a file's content", jsonl, o,
                                                 path_id="file_id"),
        "/v1/batches": {
            **_batch_op("post", "run a batch (as service tier flex)",
                        _json(_ref(BatchObject), "the batch"), o,
                        body={"application/json": {"schema": _ref(BatchCreateRequest)}}),
            **_batch_op("get", "the batches of this API key", _json(_ref(BatchList), "a page"),
                        o, query=after),
        },
        "/v1/batches/{batch_id}": _batch_op("get", "a batch", _json(_ref(BatchObject), "the "
                                            "batch"), o, path_id="batch_id"),
        "/v1/batches/{batch_id}/cancel": _batch_op(
            "post", "cancel a batch", _json(_ref(BatchObject), "the batch"), o, path_id="batch_id"
        ),
        "/v1/messages/batches": {
            **_batch_op("post", "Anthropic message batch (run as service tier flex)",
                        _json(_ref(MessageBatch), "the batch"), a,
                        body={"application/json": {"schema": _ref(MessageBatchCreateRequest)}}),
            **_batch_op("get", "the message batches of this API key",
                        _json(_ref(MessageBatchList), "a page"), a,
                        query=[{"name": n, "in": "query", "schema": {"type": "string"}}
                               for n in ("after_id", "before_id")]
                        + [{"name": "limit", "in": "query",
                            "schema": {"type": "integer", "minimum": 1}}]),
        },
        "/v1/messages/batches/{batch_id}": _batch_op(
            "get", "a message batch", _json(_ref(MessageBatch), "the batch"), a,
            path_id="batch_id"),
        "/v1/messages/batches/{batch_id}/cancel": _batch_op(
            "post", "cancel a message batch", _json(_ref(MessageBatch), "the batch"), a,
            path_id="batch_id"),
        "/v1/messages/batches/{batch_id}/results": _batch_op(
            "get", "the results (JSONL, one line per request) of an ended message batch",
            {"description": "JSONL", "content": {"application/binary": {
                "schema": {"type": "string"}}}}, a, path_id="batch_id"),
    }  # fmt: skip


@cache
def _schemas() -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in _MODELS], ref_template=_REF, schema_generator=_Schema
    )
    return defs["$defs"]


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway's public API (not /admin, not /metrics)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "epdserve gateway", "version": "1"},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
            "schemas": copy.deepcopy(_schemas()),
        },
        "paths": {
            "/v1/chat/completions": _post(
                "OpenAI chat completion",
                _ref(ChatCompletionRequest),
                _generated(ChatCompletion),
                OpenAIError,
                generates=True,
            ),
            "/v1/completions": _post(
                "OpenAI completion",
                _ref(CompletionRequest),
                _generated(Completion),
                OpenAIError,
                generates=True,
            ),
            "/v1/messages": _post(
                "Anthropic message",
                _ref(MessagesRequest),
                _generated(MessageResponse),
                AnthropicError,
                generates=True,
            ),
            "/v1/responses": _post(
                "OpenAI response (stored for previous_response_id unless store=false)",
                _ref(ResponsesRequest),
                _generated(ResponseObject),
                OpenAIError,
                generates=True,
            ),
            "/v1/responses/{response_id}": {
                **_stored("get", "a stored response", ResponseObject),
                **_stored("delete", "delete a stored response", ResponseDeleted),
            },
            "/v1/responses/{response_id}/input_items": _stored(
                "get", "the input items of a stored response", InputItemList, _PAGE
            ),
            "/v1/responses/{response_id}/cancel": _stored(
                "post", "cancel a background response", ResponseObject
            ),
            "/v1/embeddings": _pooled("OpenAI embeddings", EmbeddingRequest, EmbeddingResponse),
            "/v1/rerank": _pooled(
                "rerank documents (Jina / Cohere, as vLLM)", RerankRequest, RerankResponse
            ),
            "/v2/rerank": _pooled(
                "rerank documents (Cohere v2, as vLLM)", RerankRequest, RerankResponse
            ),
            "/v1/score": _pooled("vLLM score of text pairs", ScoreRequest, ScoreResponse),
            "/v1/messages/count_tokens": _post(
                "Anthropic token count: the prompt length /v1/messages would have",
                _ref(CountTokensRequest),
                _json(_ref(CountTokensResponse), "the result"),
                AnthropicError,
            ),
            "/tokenize": _post(
                "vLLM tokenize: the token ids of a prompt or a chat",
                {"oneOf": [_ref(TokenizeCompletionRequest), _ref(TokenizeChatRequest)]},
                _json(_ref(TokenizeResponse), "the result"),
                OpenAIError,
            ),
            "/detokenize": _post(
                "vLLM detokenize: the text of token ids",
                _ref(DetokenizeRequest),
                _json(_ref(DetokenizeResponse), "the result"),
                OpenAIError,
            ),
            **_batch_paths(),
            "/v1/models": {
                "get": {
                    "summary": "models the cluster serves",
                    "security": [{"bearer": []}, {"apiKey": []}],
                    "responses": {
                        "200": _json(_ref(ModelList), "the model list"),
                        "401": _json(_ref(OpenAIError), "missing or wrong API key"),
                    },
                }
            },
            "/v1/models/{model_id}": {
                "get": {
                    "summary": "one model the cluster serves",
                    "security": [{"bearer": []}, {"apiKey": []}],
                    "parameters": [_MODEL_ID],
                    "responses": {
                        "200": _json(_ref(ModelCard), "the model"),
                        "401": _json(_ref(OpenAIError), "missing or wrong API key"),
                        "404": _json(_ref(OpenAIError), "no such model"),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "whether some worker can serve, and workers per role (no "
                    "API key needed; worker details: /admin/health)",
                    "responses": {
                        "200": _json({"type": "object"}, "healthy"),
                        "503": _json({"type": "object"}, "no usable worker"),
                    },
                }
            },
        },
    }
