"""Structured outputs in the OpenAI API (response_format, structured_outputs and guided_*
fields) and the Anthropic API (output_config.format, output_format) become the engine's
StructuredOutputsParams; bad ones are 400s naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.common.convert import params_from_proto, params_to_proto
from services.common.proto import worker_pb2 as pb
from services.engine import grammar
from services.engine.sampling_params import MAX_CHOICES, StructuredOutputsParams
from services.router.api.anthropic import sampling_from_anthropic
from services.router.api.openai import sampling_from_openai
from services.router.errors import APIError
from services.router.features.structured import set_json_schema

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def parse(extra: dict[str, Any], chat: bool = True) -> StructuredOutputsParams | None:
    body = {"model": "m", "messages": [], **extra}
    return sampling_from_openai(body, chat=chat).structured_outputs


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
        (
            {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
            StructuredOutputsParams(json=SCHEMA),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputsParams(json=SCHEMA)),
        ({"structured_outputs": {"json": json.dumps(SCHEMA), "disable_fallback": True}},
         StructuredOutputsParams(json=SCHEMA)),
        ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredOutputsParams(regex="[0-9]+")),
        ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutputsParams(choice=["a", "b"])),
        ({"structured_outputs": {"grammar": 'start: "x"'}},
         StructuredOutputsParams(grammar='start: "x"')),
        ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
        ({"guided_regex": "a+"}, StructuredOutputsParams(regex="a+")),
        ({"guided_choice": ["y", "n"]}, StructuredOutputsParams(choice=["y", "n"])),
        ({"guided_grammar": 'start: "x"'}, StructuredOutputsParams(grammar='start: "x"')),
    ],
)  # fmt: skip
def test_accepted_forms(extra, expected, chat):
    assert parse(extra, chat) == expected


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
         "response_format"),
        ({"structured_outputs": []}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{bad"}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
        ({"guided_choice": []}, "guided_choice"),
        # More strings than MAX_CHOICES: llguidance's compile time grows faster than the list.
        ({"structured_outputs": {"choice": [f"c{i}" for i in range(MAX_CHOICES + 1)]}},
         "structured_outputs"),
        ({"guided_choice": [f"c{i}" for i in range(MAX_CHOICES + 1)]}, "guided_choice"),
        # So do a schema's enums (200,000 strings: 16 s, then "too big"), counted in all.
        ({"guided_json": {"enum": [f"c{i}" for i in range(MAX_CHOICES + 1)]}}, "guided_json"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {k: {"enum": [f"c{i}" for i in range(MAX_CHOICES // 2 + 1)]}
                                             for k in "ab"}}}}}, "response_format"),
        ({"guided_regex": 5}, "guided_regex"),
        ({"guided_json": [1]}, "guided_json"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ],
)  # fmt: skip
def test_bad_forms_are_400_naming_the_field(extra, param):
    with pytest.raises(APIError) as info:
        parse(extra)
    err = info.value.openai_body()["error"]
    assert info.value.status == 400
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_constraint_reaches_the_wire():
    params = sampling_from_openai(
        {"structured_outputs": {"choice": ["a", "b"]}, "temperature": 0}, chat=True
    )
    back = params_from_proto(params_to_proto(params))
    assert back.structured_outputs == StructuredOutputsParams(choice=["a", "b"])


def test_set_json_schema():
    msg = pb.SamplingParams(max_tokens=5)
    msg.structured_outputs.regex = "x"
    set_json_schema(msg, SCHEMA)
    assert params_from_proto(msg).structured_outputs == StructuredOutputsParams(json=SCHEMA)


@pytest.mark.parametrize(
    "extra",
    [
        {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
        {"output_format": {"type": "json_schema", "schema": SCHEMA}},  # the beta's name
        {"output_config": {"effort": "low", "format": {"type": "json_schema", "schema": SCHEMA}}},
    ],
)
def test_anthropic_output_format_is_a_json_schema(extra: dict[str, Any]) -> None:
    body = {"model": "m", "max_tokens": 8, "messages": [], **extra}
    assert sampling_from_anthropic(body).structured_outputs == StructuredOutputsParams(json=SCHEMA)
    assert sampling_from_anthropic({"model": "m", "max_tokens": 8}).structured_outputs is None


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"output_config": 3}, "output_config", "must be an object"),
        ({"output_format": {"type": "json_object"}}, "output_format", "'json_schema'"),
        ({"output_format": {"type": "json_schema"}}, "output_format", "schema"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {"type": 5}}}},
         "output_config.format", "type must be a string"),
        ({"output_format": {"type": "json_schema", "schema": SCHEMA},
          "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
         "output_format", "not both"),
    ],
)  # fmt: skip
def test_anthropic_bad_output_formats_are_400s(extra: dict[str, Any], param: str, words: str):
    with pytest.raises(APIError) as ei:
        sampling_from_anthropic({"model": "m", "max_tokens": 8, **extra})
    assert ei.value.status == 400 and ei.value.param == param and words in ei.value.message


def test_a_compiler_panic_is_a_400_without_its_backtrace(monkeypatch) -> None:
    """llguidance's panics (100,000 choices hit its symbol limit) carry a Rust backtrace of
    tens of lines; the client gets the first line."""
    import llguidance

    first = "panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10"
    panic = first + "\n<backtrace>\n   0: <unknown>\n   1: <unknown>\n"
    monkeypatch.setattr(llguidance.LLMatcher, "validate_grammar", lambda g: panic)
    grammar.compile_grammar.cache_clear()
    try:
        with pytest.raises(APIError) as info:
            parse({"structured_outputs": {"regex": "panics+"}})
    finally:
        grammar.compile_grammar.cache_clear()
    message = info.value.openai_body()["error"]["message"]
    assert info.value.status == 400 and message.endswith(first), message
