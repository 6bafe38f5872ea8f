"""Tool calling through a real cluster with the official OpenAI and Anthropic SDKs: forced
calls (structured outputs) parse into valid calls, streamed or not; a conversation with
earlier calls and results renders; tool_choice "none" is plain chat."""

from __future__ import annotations

import json

import pytest
from cluster_helpers import TINY_NAME, anthropic_client, openai_client

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function",
           "function": {"name": "get_weather", "description": "Weather in a city",
                        "parameters": PARAMS}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}


def check_args(name: str, arguments: str | dict) -> None:
    """The arguments satisfy the tool's schema."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    if name == "get_weather":
        assert set(args) == {"city", "unit"}, args
        assert isinstance(args["city"], str) and len(args["city"]) <= 8, args
        assert args["unit"] in ("c", "f"), args
    else:
        assert name == "get_time" and args in ({"zone": "utc"}, {"zone": "cet"}), (name, args)


@pytest.fixture(scope="module")
def cluster(tool_cluster):
    return tool_cluster  # shared with test_responses.py (tests/conftest.py)


@pytest.fixture(scope="module")
def oai(cluster):
    return openai_client(cluster, timeout=120)


@pytest.fixture(scope="module")
def claude(cluster):
    return anthropic_client(cluster, timeout=120)


def streamed_calls(chunks) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, arguments) of the calls assembled from a chat stream, and its finish reasons."""
    calls: dict[int, list[str]] = {}
    finishes = []
    for c in chunks:
        if not c.choices:
            continue
        if c.choices[0].finish_reason:
            finishes.append(c.choices[0].finish_reason)
        for tc in c.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(tc.index, ["", ""])
            slot[0] += (tc.function.name or "") if tc.function else ""
            slot[1] += (tc.function.arguments or "") if tc.function else ""
    return [(n, a) for n, a in (calls[i] for i in sorted(calls))], finishes


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
def test_forced_call_is_valid_and_the_same_streamed(oai, choice) -> None:
    kw = dict(model=TINY_NAME, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=choice,
              parallel_tool_calls=False, max_tokens=96, **GREEDY)  # fmt: skip
    r = oai.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", msg
    assert msg.tool_calls and len(msg.tool_calls) == 1, msg
    tc = msg.tool_calls[0]
    assert tc.id.startswith("chatcmpl-tool-") and tc.type == "function"
    if isinstance(choice, dict):
        assert tc.function.name == "get_time"
    check_args(tc.function.name, tc.function.arguments)
    calls, finishes = streamed_calls(oai.chat.completions.create(**kw, stream=True))
    assert calls == [(tc.function.name, tc.function.arguments)]
    assert finishes == ["tool_calls"]


def test_anthropic_forced_tool_use_streamed_and_not(claude) -> None:
    tools = [{"name": "get_weather", "description": "Weather in a city", "input_schema": PARAMS}]
    kw = dict(model=TINY_NAME, max_tokens=96, messages=ASK, tools=tools,
              tool_choice={"type": "any"}, extra_body=GREEDY)  # fmt: skip
    m = claude.messages.create(**kw)
    assert m.stop_reason == "tool_use", m
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) >= 1 and uses[0].id.startswith("toolu_") and uses[0].name == "get_weather"
    for u in uses:
        check_args(u.name, u.input)
    with claude.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        (u.name, u.input) for u in uses
    ]
    assert final.stop_reason == "tool_use"


def test_conversation_with_calls_and_results(oai, claude) -> None:
    turns = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees, sunny"},
    ]  # fmt: skip
    r = oai.chat.completions.create(model=TINY_NAME, messages=turns, tools=[WEATHER],
                                    max_tokens=8, **GREEDY)  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 60  # the tools, the call and the result are in the prompt
    m = claude.messages.create(
        model=TINY_NAME, max_tokens=8, extra_body=GREEDY,
        tools=[{"name": "get_weather", "description": "Weather in a city", "input_schema": PARAMS}],
        messages=[*ASK,
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                   "name": "get_weather", "input": {"city": "Paris", "unit": "c"}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                   "content": "22 degrees, sunny"}]}],
    )  # fmt: skip
    assert m.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # the same conversation gives the same prompt through either API
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == r.usage.prompt_tokens


def test_tool_choice_none_is_plain_chat(oai) -> None:
    kw = dict(model=TINY_NAME, messages=ASK, max_tokens=12, **GREEDY)
    plain = oai.chat.completions.create(**kw)
    r = oai.chat.completions.create(**kw, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.choices[0].finish_reason == plain.choices[0].finish_reason
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens  # tools left out of the prompt
