"""Tool calling at the router: request validation, prompt rendering, output parsers (whole
and streamed in any split), and the OpenAI / Anthropic responses over a scripted worker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from router_fakes import ScriptedEngine, sse_events, start_fake_worker, start_gateway, until_healthy

from services.common.proto import worker_pb2 as pb
from services.engine.resume import Resume
from services.engine.sampling_params import SamplingParams
from services.router.api.openai_output import openai_deltas
from services.router.errors import APIError
from services.router.features.tool_parsers.base import ParsedCall, ToolStream, extract
from services.router.features.tool_parsers.factory import available_tool_parsers, tool_parser_class
from services.router.features.tool_parsers.forced import JsonArrayParser, NamedFunctionParser
from services.router.features.tool_parsers.hermes import HermesToolParser
from services.router.features.tool_parsers.llama3_json import Llama3JsonToolParser
from services.router.features.tool_prompt import prepare, template_uses_tools
from services.router.features.tools import ToolSetup, anthropic_tools, openai_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def call(name: str, **args: Any) -> ParsedCall:
    return ParsedCall(name, json.dumps(args))


# -- Validation -----------------------------------------------------------------------------


LOOKBEHIND = {
    "type": "function",
    "function": {
        "name": "g",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}},
        },
    },
}


def test_openai_tools_defaults_and_choices() -> None:
    assert openai_tools({}).choice == "none" and not openai_tools({}).render
    s = openai_tools({"tools": [WEATHER]})
    assert s.choice == "auto" and s.render and s.schema is None
    assert openai_tools({"tools": [WEATHER], "tool_choice": "none"}).render is False
    named = openai_tools({"tools": [WEATHER, TIME], "parallel_tool_calls": False,
                          "tool_choice": {"type": "function", "function": {"name": "get_time"}}})  # fmt: skip
    assert (named.choice, named.function, named.parallel) == ("function", "get_time", False)
    assert named.schema == {"type": "object"}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": {"a": 1}}, "tools", "array"),
        ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0]"),
        ({"tools": [{"type": "function"}]}, "tools", "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
            "tools",
            "parameters",
        ),  # fmt: skip
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ]
            },
            "tools",
            "object",
        ),  # fmt: skip
        ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice", "needs"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),  # fmt: skip
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice", "name"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
        (  # forced: the schema must compile into the output constraint (look-behind: no)
            {"tools": [LOOKBEHIND], "tool_choice": "required"},
            "tools",
            "cannot constrain",
        ),  # fmt: skip
        (
            {"tools": [LOOKBEHIND], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tools",
            "look-around",
        ),  # fmt: skip
    ],
)
def test_openai_bad_tools_are_400_naming_the_param(body, param, words) -> None:
    with pytest.raises(APIError) as ei:
        openai_tools(body)
    assert ei.value.status == 400 and ei.value.param == param
    assert words in ei.value.message


class _CountedName(str):
    """A tool name that counts its comparisons with other names."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedName.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_the_unique_name_check_is_linear_in_the_tools() -> None:
    # Each name was counted in the whole list: a 4 MiB body holds ~84,000 tools, whose check
    # cost minutes of a preprocessing thread's CPU for one request.
    n = 2000
    tools = [{"type": "function", "function": {"name": _CountedName(f"f{i}")}} for i in range(n)]
    _CountedName.compared = 0
    assert len(openai_tools({"tools": tools}).tools) == n
    assert _CountedName.compared <= 2 * n


def test_anthropic_tools_are_converted_and_checked() -> None:
    tool = {"name": "get_weather", "description": "d", "input_schema": WEATHER["function"]["parameters"]}  # fmt: skip
    s = anthropic_tools({"tools": [tool]})
    assert s.choice == "auto" and s.tools[0]["function"]["parameters"]["required"] == ["city"]
    assert anthropic_tools({"tools": [tool], "tool_choice": {"type": "any"}}).choice == "required"
    s = anthropic_tools({"tools": [tool], "tool_choice": {"type": "tool", "name": "get_weather",
                                                          "disable_parallel_tool_use": True}})  # fmt: skip
    assert (s.choice, s.function, s.parallel) == ("function", "get_weather", False)
    assert anthropic_tools({"tools": [tool], "tool_choice": {"type": "none"}}).render is False
    for body in (
        {"tools": [{"name": "x"}]},  # no input_schema
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"tools": [tool], "tool_choice": {"type": "tool", "name": "other"}},
        {"tools": [tool], "tool_choice": "auto"},
        {"tool_choice": {"type": "any"}},
        {"tools": [tool], "tool_choice": {"type": ["any"]}},  # was a TypeError: a 500
    ):
        with pytest.raises(APIError) as ei:
            anthropic_tools(body)
        assert ei.value.status == 400 and ei.value.param in ("tools", "tool_choice")


def test_required_schema_lists_each_tool_and_caps_parallel() -> None:
    s = ToolSetup([WEATHER, TIME], "required", parallel=False)
    schema = s.schema
    assert schema is not None and schema["type"] == "array" and schema["minItems"] == 1
    assert schema["maxItems"] == 1
    names = [a["properties"]["name"]["enum"] for a in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    params = pb.SamplingParams()
    s.constrain(params)
    assert json.loads(params.structured_outputs.json_schema) == schema
    untouched = pb.SamplingParams()
    ToolSetup([WEATHER], "auto").constrain(untouched)
    assert not untouched.HasField("structured_outputs")


# -- Parsers --------------------------------------------------------------------------------


def parse(parser, text: str, max_calls: int | None = None) -> tuple[str, list[ParsedCall]]:
    return extract(ToolStream(parser, max_calls), text)


def test_factory_names() -> None:
    assert available_tool_parsers() == ["hermes", "llama3_json"]
    assert tool_parser_class("hermes") is HermesToolParser
    with pytest.raises(ValueError, match="unknown tool call parser"):
        tool_parser_class("mistral")


def test_hermes_calls_and_content() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n')  # fmt: skip
    content, calls = parse(HermesToolParser(), text)
    assert content == "Let me check."
    assert calls == [call("get_weather", city="Paris"), call("get_time")]
    # a cap on the number of calls (parallel_tool_calls false)
    assert parse(HermesToolParser(), text, max_calls=1)[1] == [call("get_weather", city="Paris")]
    # no calls: the text is untouched, trailing whitespace included
    assert parse(HermesToolParser(), "a < b <tool\n") == ("a < b <tool\n", [])
    # invalid JSON in a block: the block stays content
    bad = "x <tool_call>{not json}</tool_call>"
    assert parse(HermesToolParser(), bad) == (bad, [])
    # an unclosed block at the end still counts when it holds a complete call
    assert parse(HermesToolParser(), '<tool_call>{"name": "f", "arguments": {"a": 1}}') == (
        "", [call("f", a=1)])  # fmt: skip
    assert parse(HermesToolParser(), '<tool_call>{"name": ') == ('<tool_call>{"name": ', [])
    # "parameters" and stringified arguments are accepted
    assert parse(HermesToolParser(), '<tool_call>{"name": "f", "parameters": "{\\"a\\": 2}"}'
                 "</tool_call>")[1] == [call("f", a=2)]  # fmt: skip


def test_llama3_json() -> None:
    p = Llama3JsonToolParser
    assert parse(p(), '{"name": "get_time", "parameters": {}}') == ("", [call("get_time")])
    two = '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}'
    assert parse(p(), two) == ("", [call("f", a=1), call("g")])
    assert parse(p(), "The answer is {x}") == ("The answer is {x}", [])
    assert parse(p(), ' {"a": 1} is JSON') == (' {"a": 1} is JSON', [])  # not a call
    assert parse(p(), '{"name": "f", "parameters": {"a"') == (
        '{"name": "f", "parameters": {"a"',
        [],
    )
    assert parse(p(), '{"name": "f", "parameters": {}} done') == (" done", [call("f")])


def test_forced_parsers() -> None:
    arr = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'  # fmt: skip
    assert parse(JsonArrayParser(), arr) == (
        "",
        [call("get_weather", city="Oslo"), call("get_time")],
    )
    cut = '[{"name": "get_time", "parameters": {}}, {"name": "get_w'
    assert parse(JsonArrayParser(), cut) == ('{"name": "get_w', [call("get_time")])
    assert parse(JsonArrayParser(), "[{") == ("[{", [])
    assert parse(JsonArrayParser(), "nope") == ("nope", [])
    assert parse(NamedFunctionParser("f"), ' {"a": [1, 2]} ') == ("", [call("f", a=[1, 2])])
    assert parse(NamedFunctionParser("f"), '{"a": ') == ('{"a": ', [])


SAMPLES = [
    (
        HermesToolParser,
        'Hi <b>\n<tool_call>\n{"name": "f", "arguments": {"s": "<tool_call>?"}}\n'
        "</tool_call>\nbye <tool_ca",
    ),  # fmt: skip
    (HermesToolParser, "<tool_call>[1]</tool_call> <tool_call>\n"),
    (
        Llama3JsonToolParser,
        '  <|python_tag|>{"name": "f", "parameters": {"x": "}"}} ;{"name": "g"}',
    ),
    (Llama3JsonToolParser, "<|python_ta"),
    (lambda: NamedFunctionParser("f"), '\n{"q": "{[\\"]}"}\n\n'),
    (
        JsonArrayParser,
        ' [ {"name": "a", "parameters": {}} ,{"name": "b", "parameters": {"k": 1}}] x',
    ),
]


def stream_all(parser, pieces: list[str], max_calls: int | None = None):
    """(content, calls) of ``pieces`` fed one by one, with the OpenAI deltas they make."""
    ts = ToolStream(parser, max_calls)
    deltas: list[dict] = []
    for i, piece in enumerate(pieces):
        deltas += openai_deltas(ts, piece, final=i == len(pieces) - 1)
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            slot = calls.setdefault(c["index"], {"name": "", "arguments": ""})
            slot["name"] += c.get("function", {}).get("name", "") or ""
            slot["arguments"] += c["function"].get("arguments", "")
            if "id" in c:
                assert c["id"].startswith("chatcmpl-tool-") and c["type"] == "function"
    got = [ParsedCall(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    return content, got


def _pieces(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(len(SAMPLES))), st.lists(st.integers(0, 120), max_size=12))
def test_any_split_gives_the_same_calls_and_content(which: int, cuts: list[int]) -> None:
    make, text = SAMPLES[which]
    whole = parse(make(), text)
    assert stream_all(make(), _pieces(text, cuts)) == whole


_json_text = st.text(st.sampled_from('ab <>{}[]"\\:,/_\n'), max_size=8)


@st.composite
def hermes_outputs(draw) -> tuple[str, list[ParsedCall]]:
    """Content and calls interleaved, written as a hermes model would."""
    text, calls = "", []
    for _ in range(draw(st.integers(0, 3))):
        text += draw(st.text(st.sampled_from("ab <\n/_tool"), max_size=10)).replace(
            "<tool_call>", ""
        )
        args = draw(st.dictionaries(_json_text, _json_text, max_size=2))
        name = draw(st.sampled_from(["f", "get_weather"]))
        calls.append(ParsedCall(name, json.dumps(args, ensure_ascii=False)))
        body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
        text += f"<tool_call>\n{body}\n</tool_call>"
    return text, calls


@settings(max_examples=200, deadline=None)
@given(hermes_outputs(), st.lists(st.integers(0, 400), max_size=15))
def test_hermes_finds_every_call_in_any_split(sample, cuts: list[int]) -> None:
    text, calls = sample
    content, got = stream_all(HermesToolParser(), _pieces(text, cuts))
    assert got == calls
    assert (content, got) == parse(HermesToolParser(), text)
    assert "<tool_call>" not in content


# -- Rendering ------------------------------------------------------------------------------

# Qwen2.5's template, reduced: tools in the system turn, calls and results as Hermes text.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}\n\n{% endif %}# Tools\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content or '' }}"
    '{% for tc in message.tool_calls %}\n<tool_call>\n{"name": "{{ tc.function.name }}", '
    '"arguments": {{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n'
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "22 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
]  # fmt: skip


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    from tests.conftest import tokenizer_source

    hf = AutoTokenizer.from_pretrained(str(tokenizer_source()))
    hf.original_template = hf.chat_template  # _render replaces chat_template
    return hf


def _render(hf, template: str, messages, setup: ToolSetup) -> str:
    from services.router.tokenization import Tokenizer

    hf.chat_template = template
    tok = Tokenizer(hf)
    msgs, tools = prepare(tok, messages, setup, HermesToolParser)
    return hf.decode(tok.apply_chat_template(msgs, tools=tools))


def test_tool_aware_template_gets_tools_calls_and_results(hf_tokenizer) -> None:
    text = _render(hf_tokenizer, TOOL_TEMPLATE, HISTORY, ToolSetup([WEATHER], "auto"))
    assert '"name": "get_weather"' in text and "Weather in a city" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n22 C\n</tool_response>" in text and "sunny" in text
    assert text.endswith("<|im_start|>assistant\n")
    # tool_choice "none": the tools are left out of the prompt
    plain = _render(hf_tokenizer, TOOL_TEMPLATE, HISTORY, ToolSetup([WEATHER], "none"))
    assert "# Tools" not in plain and "<tool_response>\n22 C" in plain


def test_chat_template_kwargs_reach_the_template(hf_tokenizer) -> None:
    """vLLM's chat_template_kwargs (Qwen3's enable_thinking, ...): variables of the template;
    they were ignored."""
    from services.router.tokenization import Tokenizer

    hf_tokenizer.chat_template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"
    )
    tok, msgs = Tokenizer(hf_tokenizer), [{"role": "user", "content": "hi"}]
    off = hf_tokenizer.decode(tok.apply_chat_template(msgs, enable_thinking=False))
    assert off == "hi<no-think>" and hf_tokenizer.decode(tok.apply_chat_template(msgs)) == "hi"
    hf_tokenizer.chat_template = hf_tokenizer.original_template


def test_template_without_tools_gets_a_hermes_system_prompt(hf_tokenizer) -> None:
    chatml = hf_tokenizer.original_template  # SmolLM2's: no tools
    if isinstance(chatml, str) and "tools" in chatml:
        pytest.skip("this tokenizer's template renders tools itself")
    text = _render(hf_tokenizer, chatml, HISTORY, ToolSetup([WEATHER], "auto"))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in text
    assert "<tool_call></tool_call> XML tags" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>') in text  # fmt: skip
    # the two results make one user turn
    assert ("<|im_start|>user\n<tool_response>\n22 C\n</tool_response>\n<tool_response>\n"
            "sunny\n</tool_response><|im_end|>") in text  # fmt: skip


def test_template_uses_tools() -> None:
    from types import SimpleNamespace

    assert template_uses_tools(SimpleNamespace(hf=SimpleNamespace(chat_template=TOOL_TEMPLATE)))
    assert not template_uses_tools(SimpleNamespace(hf=SimpleNamespace(chat_template="{{ x }}")))
    assert not template_uses_tools(object())


# -- Through the gateway, over a worker whose engine writes a script ------------------------


@pytest_asyncio.fixture
async def env(etcd):
    engine = ScriptedEngine()
    worker = await start_fake_worker(etcd.endpoint, "tools", "w1", engine=engine)
    gw = await start_gateway(etcd.endpoint, "tools")
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        await until_healthy(client)
        yield client, engine
    await asyncio.wait_for(gw.stop(), 15)
    await asyncio.wait_for(worker.stop(), 15)


def test_the_scripted_engine_goes_on_after_a_resume() -> None:
    # A late fake load report can migrate a stream (resume on the same worker): the script
    # must go on from the resumed tokens, not be written twice.
    engine = ScriptedEngine()
    engine.script = ["ab", "cd", "ef"]

    async def outputs(resume: Resume | None) -> list[tuple[str, list[int], str | None]]:
        gen = engine.generate("r1", [1], SamplingParams(), resume=resume)
        return [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason)
                async for o in gen]  # fmt: skip

    assert asyncio.run(outputs(None)) == [
        ("ab", [100], None), ("cd", [101], None), ("ef", [102], "stop"),
    ]  # fmt: skip
    # Two tokens done, "abc" sent: "d" was held back and comes first.
    assert asyncio.run(outputs(Resume((100, 101), emitted_chars=3))) == [("def", [102], "stop")]


HERMES_SCRIPT = ["Sure", ".\n<tool", '_call>\n{"name": "get_weather", ',
                 '"arguments": {"city": "Paris"}}\n</tool_call>', "\n"]  # fmt: skip
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_openai_tool_calls_whole_and_streamed(env) -> None:
    client, engine = env
    engine.script = HERMES_SCRIPT
    body = {"model": "fake-model", "messages": USER, "tools": [WEATHER]}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Sure."
    [tc] = choice["message"]["tool_calls"]
    assert tc["id"].startswith("chatcmpl-tool-") and tc["type"] == "function"
    assert tc["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [d for _, d in sse_events(r.text)]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0
    assert "".join(t["function"]["arguments"] for t in calls) == '{"city": "Paris"}'
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"
    # tool_choice "none": no parsing, the text comes back as it is
    r = await client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})
    msg = r.json()["choices"][0]
    assert msg["message"]["content"] == "".join(HERMES_SCRIPT) and msg["finish_reason"] == "stop"
    assert "tool_calls" not in msg["message"]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_required_sets_the_schema_and_parses_the_array(env) -> None:
    client, engine = env
    engine.script = ['[{"name": "get_weather", "param', 'eters": {"city": "Oslo"}}]']
    body = {"model": "fake-model", "messages": USER, "tools": [WEATHER, TIME],
            "tool_choice": "required"}  # fmt: skip
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["content"] is None
    assert [t["function"] for t in msg["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    ]
    so = engine.params[-1].structured_outputs
    assert so is not None and so.json == ToolSetup([WEATHER, TIME], "required").schema
    r = await client.post("/v1/chat/completions", json={
        **body, "response_format": {"type": "json_object"}})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_anthropic_tool_use_whole_and_streamed(env) -> None:
    client, engine = env
    engine.script = HERMES_SCRIPT
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    body = {"model": "fake-model", "max_tokens": 50, "messages": USER, "tools": [tool]}
    r = await client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["stop_reason"] == "tool_use"
    text, use = m["content"]
    assert text == {"type": "text", "text": "Sure."}
    assert use["type"] == "tool_use" and use["id"].startswith("toolu_")
    assert (use["name"], use["input"]) == ("get_weather", {"city": "Paris"})
    r = await client.post("/v1/messages", json={**body, "stream": True})
    events = sse_events(r.text)
    starts = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert starts == ["text", "tool_use"]
    partial = "".join(d["delta"].get("partial_json", "") for n, d in events
                      if n == "content_block_delta")  # fmt: skip
    assert json.loads(partial) == {"city": "Paris"}
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert stops == [0, 1]
    assert [d["delta"]["stop_reason"] for n, d in events if n == "message_delta"] == ["tool_use"]
    # a conversation with a tool_use turn and a tool_result renders and answers
    engine.script = ["It is 22 C."]
    turns = [*USER,
             {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
              "name": "get_weather", "input": {"city": "Paris"}}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
              "content": [{"type": "text", "text": "22 C"}]}]}]  # fmt: skip
    r = await client.post("/v1/messages", json={**body, "messages": turns})
    assert r.status_code == 200 and r.json()["content"] == [{"type": "text", "text": "It is 22 C."}]
    assert r.json()["stop_reason"] == "end_turn"


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_anthropic_forced_call_cut_by_max_tokens_is_an_incomplete_tool_use(env) -> None:
    # As Anthropic answers: stop_reason max_tokens, the call being written last, its input
    # what the partial JSON holds (the streamed partial_json, as the SDK reads it). Before,
    # the JSON written so far came back as a text block.
    client, engine = env
    engine.finish = "length"
    tools = [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]},
             {"name": "get_time", "input_schema": {"type": "object"}}]  # fmt: skip
    cases = [
        ({"type": "any"}, ['[{"name": "get_time", "parameters": {}}, {"name": "get_weather", ',
                           '"parameters": {"city": "Pa', 'ris", "unit": "c'],
         [("get_time", {}, "{}"), ("get_weather", {"city": "Paris"}, '{"city": "Paris", "unit": "c')]),
        ({"type": "tool", "name": "get_weather"}, ['{"ci', 'ty": ["Oslo", {"a": 1'],
         [("get_weather", {"city": ["Oslo", {"a": 1}]}, '{"city": ["Oslo", {"a": 1')]),
        ({"type": "any"}, ['[{"name": "get_time", "parameters": {}}', ", "], [("get_time", {}, "{}")]),
    ]  # fmt: skip
    for choice, script, want in cases:
        engine.script = script
        body = {"model": "fake-model", "max_tokens": 9, "messages": USER, "tools": tools,
                "tool_choice": choice}  # fmt: skip
        m = (await client.post("/v1/messages", json=body)).json()
        assert m["stop_reason"] == "max_tokens", m
        assert [(b["type"], b["name"], b["input"]) for b in m["content"]] == [
            ("tool_use", name, args) for name, args, _ in want]  # fmt: skip
        r = await client.post("/v1/messages", json={**body, "stream": True})
        events = sse_events(r.text)
        blocks = [d["content_block"] for n, d in events if n == "content_block_start"]
        assert [(b["type"], b["name"]) for b in blocks] == [("tool_use", n) for n, _, _ in want]
        partial = ["".join(d["delta"]["partial_json"] for n, d in events
                           if n == "content_block_delta" and d["index"] == i)
                   for i in range(len(blocks))]  # fmt: skip
        assert partial == [text for _, _, text in want]
        assert [d["delta"]["stop_reason"] for n, d in events if n == "message_delta"] == [
            "max_tokens"]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_bad_tool_requests_are_400_in_each_format(env) -> None:
    client, _ = env
    r = await client.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": USER, "tools": [{"type": "function"}]})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = await client.post("/v1/chat/completions", json={"model": "fake-model", "messages": [
        *USER, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "arguments" in r.json()["error"]["message"]
    r = await client.post("/v1/messages", json={
        "model": "fake-model", "max_tokens": 5, "messages": USER,
        "tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool"}})  # fmt: skip
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = await client.post("/v1/messages", json={
        "model": "fake-model", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f"}]}]})  # fmt: skip
    assert r.status_code == 400 and "tool_use" in r.json()["error"]["message"]
    # A tool_result must answer a tool_use of the turn just before it (Anthropic 400s it).
    use = {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}  # fmt: skip
    for turns in ([*USER, use, answer("toolu_2")], [answer("toolu_1")],
                  [*USER, use, answer("toolu_1"), {"role": "assistant", "content": "ok"},
                   answer("toolu_1")]):  # fmt: skip
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            r = await client.post(path, json={"model": "fake-model", "max_tokens": 5,
                                              "messages": turns})  # fmt: skip
            err = r.json()["error"]
            assert r.status_code == 400 and err["type"] == "invalid_request_error", r.text
            assert "unexpected `tool_use_id`" in err["message"] and "toolu_" in err["message"]


def answer(tool_use_id: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id,
                                         "content": "22 C"}]}  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_router_flag_picks_the_llama3_json_parser(etcd) -> None:
    engine = ScriptedEngine()
    engine.script = ['{"name": "get_time", ', '"parameters": {}}']
    worker = await start_fake_worker(etcd.endpoint, "tools-llama", "w1", engine=engine)
    gw = await start_gateway(etcd.endpoint, "tools-llama", tool_call_parser="llama3_json")
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            await until_healthy(client)
            r = await client.post("/v1/chat/completions", json={
                "model": "fake-model", "messages": USER, "tools": [WEATHER, TIME]})  # fmt: skip
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls", choice
            assert choice["message"]["tool_calls"][0]["function"] == {
                "name": "get_time", "arguments": "{}"}  # fmt: skip
    finally:
        await asyncio.wait_for(gw.stop(), 15)
        await asyncio.wait_for(worker.stop(), 15)
