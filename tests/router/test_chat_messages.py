"""OpenAI chat messages as the gateway reads them (services/router/api/openai.py
chat_messages): a 400 in OpenAI's words for a conversation the API refuses."""

from __future__ import annotations

from typing import Any

import pytest

from services.router.api.anthropic import parse_messages
from services.router.api.openai import chat_messages
from services.router.api.protocol.common import parse
from services.router.api.protocol.openai import ChatCompletionRequest, CompletionRequest
from services.router.api.responses_input import check_call_outputs, input_messages
from services.router.errors import APIError

USER = {"role": "user", "content": "Weather in Paris?"}


def calls(*ids: str) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for i in ids]}  # fmt: skip


def result(call_id: Any) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "22 C"}


def test_tool_results_answering_the_previous_calls_are_kept() -> None:
    msgs, _ = chat_messages([USER, calls("c1", "c2"), result("c1"), result("c2"),
                             {"role": "assistant", "content": "Sunny."}, USER])  # fmt: skip
    assert [m.get("tool_call_id") for m in msgs] == [None, None, "c1", "c2", None, None]


@pytest.mark.parametrize(
    ("turns", "words"),
    [
        # a tool message with no assistant tool_calls before it
        ([USER, result("c1")], "must be a response to a preceeding message with 'tool_calls'"),
        ([result("c1")], "must be a response to a preceeding message with 'tool_calls'"),
        # after the calls' turn ended (a user message between)
        ([USER, calls("c1"), result("c1"), USER, result("c1")], "preceeding message"),
        # an id the previous calls do not hold
        ([USER, calls("c1"), result("c2")], "'tool_call_id' of 'c2' not found"),
        # no tool_call_id at all, or not a string
        ([USER, calls("c1"), result(None)], "tool_call_id"),
        ([USER, calls("c1"), result(7)], "tool_call_id"),
    ],
)
def test_stray_tool_messages_are_400(turns: list[dict[str, Any]], words: str) -> None:
    """OpenAI refuses these with a 400; they were accepted, and the prompt held an answer to
    no call."""
    with pytest.raises(APIError) as err:
        chat_messages(turns)
    assert err.value.status == 400 and words in err.value.message, err.value.message
    assert err.value.param == "messages"


def test_responses_function_call_output_needs_its_call() -> None:
    """Responses API: a function_call_output whose call is neither in ``input`` nor in the
    previous_response_id chain is OpenAI's 400 on 'input' (it was accepted)."""
    output = {"type": "function_call_output", "call_id": "call_9", "output": "22 C"}
    call = {"type": "function_call", "call_id": "call_9", "name": "f", "arguments": "{}"}
    history = [USER, calls("call_1")]
    check_call_outputs(history + input_messages([call, output]))  # in the input: fine
    check_call_outputs([USER, calls("call_9")] + input_messages([output]))  # in the chain
    for turns in (input_messages([output]), history + input_messages([output])):
        with pytest.raises(APIError) as err:
            check_call_outputs(turns)
        assert err.value.status == 400 and err.value.param == "input"
        assert "No tool call found for function call output with call_id call_9" in str(err.value)


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool"])
def test_a_message_without_content_is_400(role: str) -> None:
    """OpenAI requires 'content' of every role but an assistant's (which may hold only
    tool_calls); a user turn without it was read as an empty one."""
    turns = [USER, calls("c1"), {"role": role, "tool_call_id": "c1"}]
    with pytest.raises(APIError) as err:
        chat_messages(turns)
    assert err.value.status == 400 and "messages[2].content" in err.value.message
    assert chat_messages([USER, {"role": "assistant", "content": None}])[0][1]["content"] == ""


@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_an_empty_content_array_is_400_naming_it(role: str) -> None:
    """OpenAI's schema gives a content array minItems 1 (its 400: 'empty_array', naming
    messages[i].content); [] was read as "" (as vLLM 0.32 does). An empty string stays valid."""
    with pytest.raises(APIError) as err:
        chat_messages([USER, {"role": role, "content": []}, USER])
    e = err.value
    assert (e.status, e.param, e.code) == (400, "messages[1].content", "empty_array")
    assert "Invalid 'messages[1].content': empty array." in e.message
    assert chat_messages([{"role": role, "content": ""}, USER])[0][0]["content"] == ""


def test_an_empty_tool_calls_array_is_400_naming_it() -> None:
    """OpenAI's 400 (empty_array) for an assistant turn's tool_calls: []; it was read as no
    calls. null (no calls) stays valid."""
    with pytest.raises(APIError) as err:
        chat_messages([USER, {"role": "assistant", "content": "a", "tool_calls": []}, USER])
    e = err.value
    assert (e.status, e.param, e.code) == (400, "messages[1].tool_calls", "empty_array")
    assert e.message.startswith("Invalid 'messages[1].tool_calls': empty array.")
    assert chat_messages([USER, {"role": "assistant", "content": "a", "tool_calls": None}])


@pytest.mark.parametrize("content", ["", []])
def test_anthropic_empty_content_is_400_but_for_a_final_assistant_turn(content: object) -> None:
    """Anthropic's 400; an empty user turn was sent to the template."""
    with pytest.raises(APIError) as err:
        parse_messages(None, [{"role": "user", "content": content}])
    assert err.value.status == 400 and "non-empty content" in err.value.message
    with pytest.raises(APIError):
        parse_messages(None, [{"role": "user", "content": "a"},
                              {"role": "assistant", "content": content},
                              {"role": "user", "content": "b"}])  # fmt: skip
    out, _ = parse_messages(None, [{"role": "user", "content": "a"},
                                   {"role": "assistant", "content": content}])  # fmt: skip
    assert out[-1] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "text content blocks must be non-empty"),
        (" \n", "text content blocks must contain non-whitespace text"),
    ],
)
def test_anthropic_blank_text_blocks_are_400(text: str, words: str) -> None:
    """Anthropic's 400s ("messages: ..."); a blank text block was sent to the template."""
    block = [{"type": "text", "text": text}]
    for system, turns in ((None, [{"role": "user", "content": block}]),
                          (None, [{"role": "user", "content": [block[0], {"type": "text",
                                                                          "text": "a"}]}]),
                          (block, [{"role": "user", "content": "a"}])):  # fmt: skip
        with pytest.raises(APIError) as err:
            parse_messages(system, turns)
        where = "system" if system else "messages"
        assert err.value.status == 400 and err.value.message == f"{where}: {words}"


def test_responses_empty_content_array_is_400_naming_the_input_item() -> None:
    """As chat's (OpenAI's empty_array), but named as the Responses API has it: input[i]."""
    with pytest.raises(APIError) as err:
        input_messages([{"role": "user", "content": "a"}, {"role": "user", "content": []}])
    e = err.value
    assert (e.status, e.param, e.code) == (400, "input[1].content", "empty_array")
    assert e.message.startswith("Invalid 'input[1].content': empty array.")


def test_fields_of_the_wrong_type_are_400_naming_them() -> None:
    """OpenAI's 400 ('Invalid type'); a number as a message's 'name' or as 'user' was taken."""
    with pytest.raises(APIError) as err:
        chat_messages([{"role": "user", "content": "hi", "name": 5}])
    assert err.value.status == 400 and "messages[0].name" in err.value.message
    body = {"model": "m", "messages": [USER], "user": 5}
    for model in (ChatCompletionRequest, CompletionRequest):
        with pytest.raises(APIError) as err:
            parse(model, {**body, "prompt": "hi"})
        assert err.value.status == 400 and err.value.param == "user"
    assert parse(ChatCompletionRequest, {**body, "user": "u-1"}).user == "u-1"
