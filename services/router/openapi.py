"""The gateway's OpenAPI 3 document, served at /openapi.json (written by hand, kept small)."""

from __future__ import annotations

from typing import Any

from services.engine.sampling_params import (
    MAX_STOP,
    MAX_TOKEN_COUNT,
    MAX_TOKEN_ID,
    MAX_TOP_K,
    REPETITION_PENALTY_RANGE,
)

_STR_OR_STRS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_TEXT_PARTS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    },
}
_TEXT_PART = _TEXT_PARTS["items"]
# OpenAI image part: a data: URL (base64) or an http(s) URL the router fetches.
_IMAGE_URL_PART = {
    "type": "object",
    "required": ["type", "image_url"],
    "properties": {
        "type": {"type": "string", "enum": ["image_url"]},
        "image_url": {
            "type": "object", "required": ["url"],
            "properties": {"url": {"type": "string"}, "detail": {"type": "string"}},
        },
    },
}  # fmt: skip
# Anthropic image block: base64 data with its media type, or a URL.
_IMAGE_BLOCK = {
    "type": "object",
    "required": ["type", "source"],
    "properties": {
        "type": {"type": "string", "enum": ["image"]},
        "source": {
            "oneOf": [
                {
                    "type": "object", "required": ["type", "media_type", "data"],
                    "properties": {
                        "type": {"type": "string", "enum": ["base64"]},
                        "media_type": {"type": "string", "enum": [
                            "image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp",
                        ]},
                        "data": {"type": "string", "contentEncoding": "base64"},
                    },
                },
                {
                    "type": "object", "required": ["type", "url"],
                    "properties": {"type": {"type": "string", "enum": ["url"]},
                                   "url": {"type": "string"}},
                },
            ]
        },
    },
}  # fmt: skip
# Tool calling (services/router/tools.py).
_TOOL_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}
_OPENAI_TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object", "required": ["name"],
            "properties": {"name": _TOOL_NAME, "description": {"type": "string"},
                           "parameters": {"type": "object"}},
        },
    },
}  # fmt: skip
_OPENAI_TOOL_CALL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object", "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}  # fmt: skip
_OPENAI_TOOL_FIELDS: dict[str, Any] = {
    "tools": {"type": "array", "items": _OPENAI_TOOL},
    "tool_choice": {"oneOf": [
        {"type": "string", "enum": ["none", "auto", "required"]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"],
                         "properties": {"name": {"type": "string"}}},
        }},
    ]},
    "parallel_tool_calls": {"type": "boolean"},
}  # fmt: skip
_ANTHROPIC_TOOL_BLOCKS = [
    {
        "type": "object", "required": ["type", "id", "name", "input"],
        "properties": {"type": {"type": "string", "enum": ["tool_use"]}, "id": {"type": "string"},
                       "name": {"type": "string"}, "input": {"type": "object"}},
    },
    {
        "type": "object", "required": ["type", "tool_use_id"],
        "properties": {
            "type": {"type": "string", "enum": ["tool_result"]},
            "tool_use_id": {"type": "string"},
            "content": {"oneOf": [{"type": "string"}, _TEXT_PARTS]},
            "is_error": {"type": "boolean"},
        },
    },
]  # fmt: skip
# Earlier reasoning a client sends back in an assistant turn: accepted, left out of the prompt.
_THINKING_BLOCK = {
    "type": "object", "required": ["type"],
    "properties": {"type": {"type": "string", "enum": ["thinking", "redacted_thinking"]},
                   "thinking": {"type": "string"}, "signature": {"type": "string"},
                   "data": {"type": "string"}},
}  # fmt: skip
_ANTHROPIC_TOOL_FIELDS: dict[str, Any] = {
    "tools": {"type": "array", "items": {
        "type": "object", "required": ["name", "input_schema"],
        "properties": {"name": _TOOL_NAME, "description": {"type": "string"},
                       "input_schema": {"type": "object"}},
    }},
    "tool_choice": {
        "type": "object", "required": ["type"],
        "properties": {"type": {"type": "string", "enum": ["auto", "any", "tool", "none"]},
                       "name": {"type": "string"},
                       "disable_parallel_tool_use": {"type": "boolean"}},
    },
}  # fmt: skip
_SAMPLING: dict[str, Any] = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1},
    "seed": {"type": "integer"},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {
        "type": "number",
        "minimum": REPETITION_PENALTY_RANGE[0],
        "maximum": REPETITION_PENALTY_RANGE[1],
    },
    "max_tokens": {"type": "integer", "minimum": 1},
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_COUNT},
    "stop": _STR_OR_STRS,
    "stop_token_ids": {
        "type": "array",
        "maxItems": MAX_STOP,
        "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
    },
    "ignore_eos": {"type": "boolean"},
    # Token id (a string of digits) -> a bias added to its logit before sampling.
    "logit_bias": {
        "type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    },
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object", "properties": {"include_usage": {"type": "boolean"}},
    },
    # Structured outputs (services/router/structured.py): one constraint per request.
    "response_format": {
        "type": "object", "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
            "json_schema": {
                "type": "object", "required": ["schema"],
                "properties": {"name": {"type": "string"}, "schema": {"type": "object"},
                               "strict": {"type": "boolean"}},
            },
        },
    },
    "structured_outputs": {
        "type": "object",
        "properties": {
            "json": {"oneOf": [{"type": "object"}, {"type": "string"}]},
            "json_object": {"type": "boolean"},
            "regex": {"type": "string"},
            "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "grammar": {"type": "string"},
        },
    },
    "guided_json": {"oneOf": [{"type": "object"}, {"type": "string"}]},
    "guided_regex": {"type": "string"},
    "guided_choice": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "guided_grammar": {"type": "string"},
}  # fmt: skip

_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
                    "content": {
                        "oneOf": [
                            {"type": "string"},
                            {"type": "null"},
                            {"type": "array", "items": {"oneOf": [_TEXT_PART, _IMAGE_URL_PART]}},
                        ]
                    },
                    "tool_calls": {"type": "array", "items": _OPENAI_TOOL_CALL},
                    "tool_call_id": {"type": "string"},
                },
            },
        },
        **_SAMPLING,
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        **_OPENAI_TOOL_FIELDS,
    },
}
_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": {"type": "string"},
        "prompt": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": {"type": "string"}},
                {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                {
                    "type": "array", "minItems": 1,
                    "items": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                },
            ]
        },
        **_SAMPLING,
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "echo": {"type": "boolean", "enum": [False]},
    },
}  # fmt: skip
# Anthropic structured outputs: output_config.format (GA) or the beta's output_format.
_ANTHROPIC_FORMAT = {
    "type": "object", "required": ["type", "schema"],
    "properties": {"type": {"type": "string", "enum": ["json_schema"]},
                   "schema": {"type": "object"}},
}  # fmt: skip
_MESSAGES_REQUEST = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        "model": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "output_config": {"type": "object", "properties": {"format": _ANTHROPIC_FORMAT}},
        "output_format": _ANTHROPIC_FORMAT,
        "system": {"oneOf": [{"type": "string"}, _TEXT_PARTS]},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": ["user", "assistant"]},
                    "content": {
                        "oneOf": [
                            {"type": "string"},
                            {
                                "type": "array",
                                "items": {
                                    "oneOf": [
                                        _TEXT_PART,
                                        _IMAGE_BLOCK,
                                        *_ANTHROPIC_TOOL_BLOCKS,
                                        _THINKING_BLOCK,
                                    ]
                                },
                            },
                        ]
                    },
                },
            },
        },
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "maximum": MAX_TOP_K},
        "stop_sequences": {"type": "array", "items": {"type": "string"}},
        "stream": {"type": "boolean"},
        **_ANTHROPIC_TOOL_FIELDS,
    },
}

# POST /v1/messages/count_tokens: the prompt fields of a Messages request.
_COUNT_TOKENS_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        k: v for k, v in _MESSAGES_REQUEST["properties"].items()  # type: ignore[attr-defined]
        if k in ("model", "system", "messages", "tools", "tool_choice")
    },
}  # fmt: skip
# vLLM's POST /tokenize: a completion prompt or a chat.
_TOKENIZE_REQUEST = {
    "oneOf": [
        {
            "type": "object", "required": ["prompt"],
            "properties": {"model": {"type": "string"}, "prompt": {"type": "string"},
                           "add_special_tokens": {"type": "boolean"},
                           "return_token_strs": {"type": "boolean"}},
        },
        {
            "type": "object", "required": ["messages"],
            "properties": {
                "model": {"type": "string"},
                "messages": _CHAT_REQUEST["properties"]["messages"],  # type: ignore[index]
                "add_generation_prompt": {"type": "boolean"},
                "continue_final_message": {"type": "boolean", "enum": [False]},
                "return_token_strs": {"type": "boolean"},
                **_OPENAI_TOOL_FIELDS,
            },
        },
    ]
}  # fmt: skip
_TOKENIZE_RESPONSE = {
    "type": "object",
    "required": ["count", "max_model_len", "tokens"],
    "properties": {
        "count": {"type": "integer"},
        "max_model_len": {"type": "integer"},
        "tokens": {"type": "array", "items": {"type": "integer"}},
        "token_strs": {"type": "array", "items": {"type": "string"}},
    },
}
_DETOKENIZE_REQUEST = {
    "type": "object",
    "required": ["tokens"],
    "properties": {
        "model": {"type": "string"},
        "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    },
}

_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"type": "string", "enum": ["error"]},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "400": _json(schema, "invalid request"),
        "401": _json(schema, "missing or wrong API key"),
        "404": _json(schema, "unknown model"),
        "413": _json(schema, "request body too large"),
        "429": _json(schema, "too many queued prompt tokens; see Retry-After"),
        "503": _json(schema, "no worker can serve the model"),
        "504": _json(schema, "the generation timed out"),
    }


def _generate(summary: str, request: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}, {"apiKey": []}],
            "requestBody": {
                "required": True, "content": {"application/json": {"schema": request}},
            },
            "responses": {
                "200": {
                    "description": "the result (JSON), or server-sent events with stream=true",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}},
                },
                **_errors(error),
            },
        }
    }  # fmt: skip


def _object(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": [field], "properties": {field: schema}}


def _count(
    summary: str, request: dict[str, Any], response: dict[str, Any], error: dict[str, Any]
) -> dict[str, Any]:
    """A tokenizer-only endpoint: nothing is generated, so no 429 / 504."""
    errors = {k: v for k, v in _errors(error).items() if k not in ("429", "504")}
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}, {"apiKey": []}],
            "requestBody": {
                "required": True, "content": {"application/json": {"schema": request}},
            },
            "responses": {"200": _json(response, "the result"), **errors},
        }
    }  # fmt: skip


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway's public API (not /admin, not /metrics)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "epdserve gateway", "version": "1"},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            }
        },
        "paths": {
            "/v1/chat/completions": _generate(
                "OpenAI chat completion", _CHAT_REQUEST, _OPENAI_ERROR
            ),
            "/v1/completions": _generate("OpenAI completion", _COMPLETION_REQUEST, _OPENAI_ERROR),
            "/v1/messages": _generate("Anthropic message", _MESSAGES_REQUEST, _ANTHROPIC_ERROR),
            "/v1/messages/count_tokens": _count(
                "Anthropic token count: the prompt length /v1/messages would have",
                _COUNT_TOKENS_REQUEST,
                _object("input_tokens", {"type": "integer"}),
                _ANTHROPIC_ERROR,
            ),
            "/tokenize": _count(
                "vLLM tokenize: the token ids of a prompt or a chat",
                _TOKENIZE_REQUEST,
                _TOKENIZE_RESPONSE,
                _OPENAI_ERROR,
            ),
            "/detokenize": _count(
                "vLLM detokenize: the text of token ids",
                _DETOKENIZE_REQUEST,
                _object("prompt", {"type": "string"}),
                _OPENAI_ERROR,
            ),
            "/v1/models": {
                "get": {
                    "summary": "models the cluster serves",
                    "security": [{"bearer": []}, {"apiKey": []}],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["object", "data"],
                                "properties": {
                                    "object": {"type": "string"},
                                    "data": {"type": "array"},
                                },
                            },
                            "the model list",
                        ),
                        "401": _json(_OPENAI_ERROR, "missing or wrong API key"),
                    },
                }  # fmt: skip
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
