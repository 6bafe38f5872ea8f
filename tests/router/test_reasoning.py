"""Reasoning parsers (``--reasoning-parser``): the split of whole outputs, the same split
whatever the pieces, and the reasoning in OpenAI and Anthropic responses through a gateway."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import pytest_asyncio
from anthropic.types import Message, RawMessageStreamEvent, ThinkingBlock, ThinkingDelta
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter
from router_fakes import ScriptedEngine, sse_events, start_fake_worker, start_gateway, until_healthy

from services.router.config import RouterConfig
from services.router.features.reasoning import base
from services.router.features.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from services.router.features.reasoning.factory import (
    available_reasoning_parsers,
    reasoning_parser_class,
)
from services.router.features.reasoning.qwen3 import Qwen3ReasoningParser

PARSERS = [Qwen3ReasoningParser, DeepSeekR1ReasoningParser]


def whole(cls, text: str) -> tuple[str, str]:
    return base.extract_reasoning(cls(), text)


def pieces_split(cls, pieces: list[str]) -> tuple[str, str]:
    """(reasoning, content) of ``pieces`` fed one by one; checks reasoning precedes content."""
    parser, reasoning, content = cls(), "", ""
    for i, piece in enumerate(pieces):
        r, c = parser.feed(piece, final=i == len(pieces) - 1)
        assert not (r and content), "reasoning after content"
        reasoning, content = reasoning + r, content + c
    return reasoning, content


def _pieces(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def oracle(text: str, implicit_start: bool) -> tuple[str, str]:
    """The split, restated plainly: an opening tag after whitespace starts the reasoning
    (DeepSeek-R1: so does the first character), the first closing tag ends it."""
    rest = text.lstrip()
    if rest.startswith("<think>"):
        body = rest[len("<think>") :]
    elif implicit_start:
        body = text
    else:
        return "", text
    reasoning, sep, content = body.partition("</think>")
    return (reasoning, content) if sep else (body, "")


def test_factory_and_config() -> None:
    assert available_reasoning_parsers() == ["deepseek_r1", "qwen3"]
    assert reasoning_parser_class("none") is None
    assert reasoning_parser_class("qwen3") is Qwen3ReasoningParser
    with pytest.raises(ValueError, match="none, deepseek_r1, qwen3"):
        reasoning_parser_class("granite")
    assert RouterConfig().reasoning_parser == "none"
    with pytest.raises(ValueError, match="reasoning_parser"):
        RouterConfig(reasoning_parser="r1")


@pytest.mark.parametrize(
    "cls, text, expected",
    [
        (Qwen3ReasoningParser, "<think>\nhm\n</think>\n\nHi", ("\nhm\n", "\n\nHi")),
        (Qwen3ReasoningParser, "\n<think>a</think>b</think>", ("a", "b</think>")),
        (Qwen3ReasoningParser, "Hi <think>a</think>b", ("", "Hi <think>a</think>b")),
        (Qwen3ReasoningParser, "a</think>b", ("", "a</think>b")),
        (Qwen3ReasoningParser, "<think>cut off", ("cut off", "")),  # vLLM: truncated thought
        (Qwen3ReasoningParser, "<thin", ("", "<thin")),
        (Qwen3ReasoningParser, "", ("", "")),
        (DeepSeekR1ReasoningParser, "hm</think>Hi", ("hm", "Hi")),
        (DeepSeekR1ReasoningParser, "<think>hm</think>Hi", ("hm", "Hi")),
        (DeepSeekR1ReasoningParser, "hm, never closed", ("hm, never closed", "")),
        (DeepSeekR1ReasoningParser, "</think>Hi", ("", "Hi")),
        (DeepSeekR1ReasoningParser, "a</thin", ("a</thin", "")),
    ],
)
def test_whole_outputs(cls, text: str, expected: tuple[str, str]) -> None:
    assert whole(cls, text) == expected == oracle(text, cls.implicit_start)


SAMPLES = [
    "<think>\nLet me see: 2 < 3.\n</think>\n\nYes.",
    "  <think>a</think>b",
    "abc</think>def",
    "<think>no end <thin </thi",
    "<thinking>x</think>y",
    "<think></think>",
]


@pytest.mark.parametrize("cls", PARSERS)
@pytest.mark.parametrize("text", SAMPLES)
def test_every_split_in_three_gives_the_whole(cls, text: str) -> None:
    expected = whole(cls, text)
    assert expected == oracle(text, cls.implicit_start)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert pieces_split(cls, [text[:i], text[i:j], text[j:]]) == expected, (i, j)


_outputs = st.lists(
    st.sampled_from(["<think>", "</think>", "<", "/", "think", ">", "a", " ", "\n", "<tool_call>"]),
    max_size=12,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PARSERS), _outputs, st.lists(st.integers(0, 80), max_size=10))
def test_any_split_gives_the_same_reasoning_and_content(cls, text: str, cuts: list[int]) -> None:
    assert pieces_split(cls, _pieces(text, cuts)) == whole(cls, text)
    assert whole(cls, text) == oracle(text, cls.implicit_start)


def test_without_hold_back_a_split_tag_leaks(monkeypatch) -> None:
    """The split tests can fail: with no text held back, a ``</think>`` cut in two is sent
    as reasoning."""
    text = "hm</think>Hi"
    assert pieces_split(DeepSeekR1ReasoningParser, ["hm</thi", "nk>Hi"]) == ("hm", "Hi")
    monkeypatch.setattr(base, "held_suffix", lambda text, marker: 0)
    assert pieces_split(DeepSeekR1ReasoningParser, ["hm</thi", "nk>Hi"]) != whole(
        DeepSeekR1ReasoningParser, text
    )


# -- Through the gateway, over a worker whose engine writes a script ------------------------


class Parsers:
    """``parsers[name]``: the client of the one gateway, set to ``--reasoning-parser name``
    (the gateway reads its config per request; one gateway instead of one per value keeps
    the fixture as light as the other gateway tests')."""

    def __init__(self, gw, client: httpx.AsyncClient) -> None:
        self.gw = gw
        self.client = client

    def __getitem__(self, name: str) -> httpx.AsyncClient:
        self.gw.gateway.cfg.reasoning_parser = name
        return self.client


@pytest_asyncio.fixture
async def env(etcd):
    """A worker, and a gateway whose --reasoning-parser the test picks per request."""
    engine = ScriptedEngine()
    worker = await start_fake_worker(etcd.endpoint, "reasoning", "w1", engine=engine)
    gw = await start_gateway(etcd.endpoint, "reasoning")
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        await until_healthy(client)
        yield Parsers(gw, client), engine
    await asyncio.wait_for(gw.stop(), 15)
    await asyncio.wait_for(worker.stop(), 15)


QWEN3_SCRIPT = ["<th", "ink>\nPar", "is, I think.</", "think>", "\n\nIt is", " sunny."]
USER = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip


async def _openai(client: httpx.AsyncClient, **extra: Any) -> tuple[dict, list[dict]]:
    """The message of a chat completion, and the deltas of the same request streamed."""
    body = {"model": "fake-model", "messages": USER, **extra}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    ChatCompletion.model_validate(r.json())
    message = r.json()["choices"][0]["message"]
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [d for _, d in sse_events(r.text)]
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    return message, [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def _joined(deltas: list[dict], key: str) -> str:
    return "".join(d.get(key) or "" for d in deltas)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_openai_reasoning_whole_and_streamed(env) -> None:
    clients, engine = env
    engine.script = QWEN3_SCRIPT
    message, deltas = await _openai(clients["qwen3"])
    assert message["reasoning_content"] == message["reasoning"] == "\nParis, I think."
    assert message["content"] == "\n\nIt is sunny."
    assert _joined(deltas, "reasoning_content") == _joined(deltas, "reasoning")
    assert _joined(deltas, "reasoning_content") == message["reasoning_content"]
    assert _joined(deltas, "content") == message["content"]
    kinds = [k for d in deltas for k in ("reasoning", "content") if d.get(k)]
    assert kinds == sorted(kinds, key=["reasoning", "content"].index), kinds
    # DeepSeek-R1: the prompt opened <think>; a thought never closed is all reasoning
    engine.script = ["Hmm", ", Paris", "</thi"]
    message, deltas = await _openai(clients["deepseek_r1"])
    assert (message["reasoning_content"], message["content"]) == ("Hmm, Paris</thi", None)
    assert _joined(deltas, "reasoning_content") == "Hmm, Paris</thi"
    assert _joined(deltas, "content") == ""
    # Qwen3 without <think>: all content, no reasoning field
    engine.script = ["It is", " sunny.</think>"]
    message, deltas = await _openai(clients["qwen3"])
    assert message["content"] == "It is sunny.</think>" and "reasoning_content" not in message
    assert _joined(deltas, "content") == message["content"]
    assert not any("reasoning_content" in d for d in deltas)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_flag_off_and_completions_leave_the_text_alone(env) -> None:
    clients, engine = env
    engine.script = QWEN3_SCRIPT
    message, deltas = await _openai(clients["none"])
    assert message["content"] == _joined(deltas, "content") == "".join(QWEN3_SCRIPT)
    assert "reasoning_content" not in message
    r = await clients["qwen3"].post(
        "/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 9}
    )
    assert r.json()["choices"][0]["text"] == "".join(QWEN3_SCRIPT)
    # a constrained output (structured outputs) is the JSON alone: not split
    engine.script = ['{"a": 1}']
    message, _ = await _openai(clients["deepseek_r1"], response_format={"type": "json_object"})
    assert message["content"] == '{"a": 1}' and "reasoning_content" not in message


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_reasoning_then_a_tool_call(env) -> None:
    clients, engine = env
    engine.script = ["<think>I need <tool", "_call> here.</th", "ink>\n\n<tool_call>\n",
                     '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>']  # fmt: skip
    message, deltas = await _openai(clients["qwen3"], tools=[WEATHER])
    assert message["reasoning_content"] == "I need <tool_call> here."
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert _joined(deltas, "reasoning_content") == "I need <tool_call> here."
    assert _joined(deltas, "content") == ""
    streamed = [t for d in deltas for t in d.get("tool_calls", [])]
    assert streamed[0]["function"]["name"] == "get_weather"
    assert "".join(t["function"]["arguments"] for t in streamed) == '{"city": "Paris"}'
    # Anthropic: thinking, then the tool_use block
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    m, streamed_m = await _anthropic(clients["qwen3"], tools=[tool])
    assert [b["type"] for b in m["content"]] == ["thinking", "tool_use"]
    assert m["content"][0]["thinking"] == "I need <tool_call> here."
    assert m["content"][1]["input"] == {"city": "Paris"} and m["stop_reason"] == "tool_use"
    assert [b["type"] for b in streamed_m["content"]] == ["thinking", "tool_use"]
    assert streamed_m["content"][0]["thinking"] == m["content"][0]["thinking"]


async def _anthropic(client: httpx.AsyncClient, **extra: Any) -> tuple[dict, dict]:
    """A /v1/messages response, and the same request streamed, folded into a message."""
    body = {"model": "fake-model", "max_tokens": 50, "messages": USER, **extra}
    r = await client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    message = r.json()
    Message.model_validate(message)
    r = await client.post("/v1/messages", json={**body, "stream": True})
    adapter: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    blocks: list[dict] = []
    for name, data in sse_events(r.text):
        event = adapter.validate_python(data)  # what the anthropic SDK parses
        if name == "content_block_start":
            blocks.append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, delta = blocks[data["index"]], data["delta"]
            if isinstance(event.delta, ThinkingDelta):
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                block["input"] = json.loads(delta["partial_json"])
    return message, {"content": blocks}


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_anthropic_thinking_block_whole_and_streamed(env) -> None:
    clients, engine = env
    engine.script = QWEN3_SCRIPT
    m, streamed = await _anthropic(clients["qwen3"])
    thinking, text = Message.model_validate(m).content
    assert isinstance(thinking, ThinkingBlock) and thinking.thinking == "\nParis, I think."
    assert m["content"][0] == {"type": "thinking", "thinking": "\nParis, I think.", "signature": ""}
    assert m["content"][1] == {"type": "text", "text": "\n\nIt is sunny."}
    assert streamed["content"] == m["content"]
    # all thinking (DeepSeek-R1, never closed): the thinking block alone
    engine.script = ["Hmm", "..."]
    m, streamed = await _anthropic(clients["deepseek_r1"])
    assert m["content"] == [{"type": "thinking", "thinking": "Hmm...", "signature": ""}]
    assert streamed["content"] == m["content"]
    # the flag off: one text block, tags and all; a thinking block sent back is accepted
    engine.script = QWEN3_SCRIPT
    turns = [*USER, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "x", "signature": ""}, {"type": "text", "text": "Hi"}]},
        {"role": "user", "content": "And now?"}]  # fmt: skip
    m, streamed = await _anthropic(clients["none"], messages=turns)
    assert m["content"] == [{"type": "text", "text": "".join(QWEN3_SCRIPT)}]
    assert streamed["content"] == m["content"]
