"""OpenAI's logit_bias: token id strings -> numbers become the engine's logit_bias and cross
the wire; bad keys and values are 400s naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.convert import params_from_proto, params_to_proto
from services.engine.sampling_params import SamplingParams
from services.router.api.openai import sampling_from_openai
from services.router.api.openapi import openapi_document
from services.router.errors import APIError


def parse(extra: dict[str, Any], chat: bool = True) -> SamplingParams:
    body = {"model": "m", "messages": [], **extra}
    return sampling_from_openai(body, chat=chat)


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ({}, None),
        ({"50256": -100}, {50256: -100.0}),
        ({"0": 100, "7": 0.5, "12": -1e-3}, {0: 100.0, 7: 0.5, 12: -1e-3}),
        ({"007": 3}, {7: 3.0}),
        ({str(2**31 - 1): 1}, {2**31 - 1: 1.0}),
    ],
)
def test_logit_bias_is_parsed(chat: bool, value, expected) -> None:
    extra = {} if value is None else {"logit_bias": value}
    assert parse(extra, chat).logit_bias == expected


@pytest.mark.parametrize(
    "value",
    [
        [1, 2],
        "50256",
        5,
        {"-1": 1},
        {"abc": 1},
        {" 5": 1},
        {"+5": 1},
        {"5.0": 1},
        {"５": 1},  # a fullwidth digit: int() would take it
        {str(2**31): 1},  # past the wire's int32
        {"5": 100.5},
        {"5": -101},
        {"5": "1"},
        {"5": True},
        {"5": None},
        {"5": [1]},
    ],
)
def test_bad_logit_bias_is_400_naming_the_field(value) -> None:
    with pytest.raises(APIError) as info:
        parse({"logit_bias": value})
    err = info.value.openai_body()["error"]
    assert info.value.status == 400
    assert err["param"] == "logit_bias" and err["type"] == "invalid_request_error"
    assert "logit_bias" in err["message"]


def test_logit_bias_reaches_the_wire() -> None:
    params = parse({"logit_bias": {"5": -100, "49151": 2.5}, "temperature": 0})
    msg = params_to_proto(params)
    assert dict(msg.logit_bias) == {5: -100.0, 49151: 2.5}
    assert params_from_proto(msg).logit_bias == {5: -100.0, 49151: 2.5}
    assert params_from_proto(params_to_proto(parse({}))).logit_bias is None


def test_openapi_documents_logit_bias() -> None:
    paths = openapi_document()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        if "$ref" in body:
            name = body["$ref"].rsplit("/", 1)[-1]
            body = openapi_document()["components"]["schemas"][name]
        schema = body["properties"]["logit_bias"]
        assert schema["type"] == "object"
        assert schema["additionalProperties"] == {"type": "number", "minimum": -100,
                                                  "maximum": 100}  # fmt: skip
