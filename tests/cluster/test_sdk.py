"""The official OpenAI and Anthropic SDKs against a real cluster (etcd, worker, router)."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from cluster_helpers import (
    TINY_NAME,
    anthropic_client,
    get_json,
    openai_client,
    worker_health,
)

from services.engine import LLM, SamplingParams

# Real processes: a few tens of seconds per module on 2 CPU cores.
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours."}]
# This anthropic SDK has no temperature argument any more: send it as an extra field.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def cluster(llama_cluster):
    return llama_cluster  # shared with other modules (tests/conftest.py)


@pytest.fixture(scope="module")
def oai(cluster):
    return openai_client(cluster, timeout=60)


@pytest.fixture(scope="module")
def claude(cluster):
    return anthropic_client(cluster, timeout=60)


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    from cluster_helpers import TINY_ENGINE

    return LLM(str(tiny_model_dir("llama")), served_model_name=TINY_NAME, **TINY_ENGINE)


def test_models_health_metrics(cluster) -> None:
    status, models = get_json(cluster.base_url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [TINY_NAME]
    status, health = get_json(cluster.base_url + "/health")
    assert status == 200 and health["roles"]["mixed"] == {"workers": 1, "ready": 1}
    assert "worker-0" not in str(health)  # the public health names no worker
    status, health = worker_health(cluster.base_url, cluster.admin_token)
    assert status == 200 and health["workers"]["worker-0"]["reachable"]
    text = httpx.get(cluster.base_url + "/metrics", timeout=5).text
    assert "epdserve:router_requests_total" in text and "epdserve:workers" in text


def test_greedy_completion_equals_offline_engine(oai, offline) -> None:
    ids = offline.tokenizer.encode(PROMPT)
    ref = offline.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    got = oai.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})  # fmt: skip
    assert got.choices[0].text == ref.outputs[0].text
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 12


def test_greedy_chat_equals_offline_engine(oai, offline) -> None:
    ref = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=10))[0]
    got = oai.chat.completions.create(model=TINY_NAME, messages=CHAT, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == ref.outputs[0].text
    assert got.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert got.choices[0].finish_reason == ref.outputs[0].finish_reason


def test_chat_stream_matches_non_stream_and_counts_usage(oai) -> None:
    kw = dict(model=TINY_NAME, messages=CHAT, max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})  # fmt: skip
    full = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8 == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert {c.id for c in chunks} == {chunks[0].id}


def test_completion_stream_logprobs_and_n(oai) -> None:
    r = oai.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=4, n=2, temperature=1.0,
                               seed=7, logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.tokens) == 4 and len(c.logprobs.top_logprobs[0]) == 2
    assert r.usage.completion_tokens == 8
    chunks = list(oai.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=4, stream=True,
                                         temperature=0, extra_body={"ignore_eos": True}))  # fmt: skip
    assert (
        "".join(c.choices[0].text for c in chunks)
        == oai.completions.create(
            model=TINY_NAME,
            prompt=PROMPT,
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )


def test_logit_bias_equals_offline_engine(oai, offline) -> None:
    ids = offline.tokenizer.encode(PROMPT)
    plain = offline.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    first = plain[0].outputs[0].token_ids[0]
    bias = {first: -100.0, 1000: 2.5}  # ban the greedy choice, favour another token a little
    ref = offline.generate(
        ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias=bias)
    )[0].outputs[0]
    assert first not in ref.token_ids
    got = oai.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                 logit_bias={str(t): b for t, b in bias.items()},
                                 extra_body={"ignore_eos": True})  # fmt: skip
    assert got.choices[0].text == ref.text != plain[0].outputs[0].text
    chat = oai.chat.completions.create(model=TINY_NAME, messages=CHAT, max_tokens=4,
                                       temperature=0, logit_bias={"1000": 100})  # fmt: skip
    assert chat.choices[0].message.content == offline.tokenizer.decode([1000] * 4)
    with pytest.raises(openai.BadRequestError) as ei:
        oai.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=2,
                               logit_bias={"5": 101})  # fmt: skip
    assert ei.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError, match="not in the vocabulary"):
        oai.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=2,
                               logit_bias={"1000000": 1})  # fmt: skip


def test_stop_strings_are_honoured(oai, claude) -> None:
    base = oai.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip
    stop = base[len(base) // 2 : len(base) // 2 + 3]
    assert stop.strip(), f"need a visible stop string from {base!r}"
    r = oai.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=16, temperature=0,
                               stop=[stop], extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]
    # the same through Anthropic's stop_sequences on the chat path
    chat_base = claude.messages.create(model=TINY_NAME, max_tokens=16, messages=CHAT,
                                       extra_body=GREEDY).content[0].text  # fmt: skip
    if len(chat_base) >= 6:
        seq = chat_base[len(chat_base) // 2 : len(chat_base) // 2 + 2]
        m = claude.messages.create(model=TINY_NAME, max_tokens=16, messages=CHAT,
                                   extra_body=GREEDY, stop_sequences=[seq])  # fmt: skip
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == seq
        assert m.content[0].text == chat_base[: chat_base.index(seq)]


def test_anthropic_messages_and_stream(claude) -> None:
    m = claude.messages.create(model=TINY_NAME, max_tokens=6, system="You are terse.",
                               messages=CHAT, extra_body=GREEDY)  # fmt: skip
    assert m.role == "assistant" and m.type == "message"
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 6
    assert m.stop_reason in ("end_turn", "max_tokens")
    with claude.messages.stream(model=TINY_NAME, max_tokens=6, system="You are terse.",
                                messages=CHAT, extra_body=GREEDY) as s:  # fmt: skip
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == m.content[0].text == final.content[0].text
    assert final.usage.output_tokens == m.usage.output_tokens
    assert final.stop_reason == m.stop_reason


WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip


def test_anthropic_count_tokens_equals_message_usage(claude) -> None:
    for extra in ({}, {"system": "You are terse."}, {"system": "Be brief.", "tools": [WEATHER]}):
        counted = claude.messages.count_tokens(model=TINY_NAME, messages=CHAT, **extra)
        m = claude.messages.create(model=TINY_NAME, max_tokens=2, messages=CHAT,
                                   extra_body=GREEDY, **extra)  # fmt: skip
        # Anthropic's input_tokens leaves out the tokens read from the cache
        prompt = m.usage.input_tokens + m.usage.cache_read_input_tokens
        assert counted.input_tokens == prompt > 0, extra
    no_tools = claude.messages.count_tokens(model=TINY_NAME, messages=CHAT, system="Be brief.")
    assert counted.input_tokens > no_tools.input_tokens  # the tools are counted
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="nope", messages=CHAT)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.count_tokens(model=TINY_NAME, messages=[])


def test_vllm_tokenize_and_detokenize(cluster, oai, offline) -> None:
    url = cluster.base_url
    ids = offline.tokenizer.encode(PROMPT)
    r = httpx.post(url + "/tokenize", json={"model": TINY_NAME, "prompt": PROMPT}, timeout=10)
    assert r.json() == {"count": len(ids), "max_model_len": 512, "tokens": ids}
    r = httpx.post(url + "/tokenize", json={"model": TINY_NAME, "prompt": PROMPT,
                                            "add_special_tokens": False}, timeout=10)  # fmt: skip
    r = httpx.post(url + "/detokenize", json={"model": TINY_NAME, "tokens": r.json()["tokens"]},
                   timeout=10)  # fmt: skip
    assert r.status_code == 200 and r.json() == {"prompt": PROMPT}
    r = httpx.post(url + "/tokenize", json={"model": TINY_NAME, "messages": CHAT}, timeout=10)
    got = oai.chat.completions.create(model=TINY_NAME, messages=CHAT, max_tokens=1)
    assert r.json()["count"] == got.usage.prompt_tokens
    r = httpx.post(url + "/detokenize", json={"model": TINY_NAME, "tokens": [10**9]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_bad_inputs_get_status_and_server_keeps_serving(cluster, oai, claude) -> None:
    url = cluster.base_url
    r = httpx.post(url + "/v1/chat/completions", content=b"{oops", timeout=10,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as ei:
        oai.completions.create(model=TINY_NAME, prompt="word " * 600, max_tokens=10)
    assert ei.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=TINY_NAME, messages=CHAT, max_tokens=500)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=TINY_NAME, messages=CHAT, temperature="hot")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=TINY_NAME, messages=[{"content": "no role"}])  # type: ignore[list-item]
    r = httpx.post(url + "/v1/messages", json={"model": TINY_NAME, "messages": CHAT}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nope", max_tokens=4, messages=CHAT)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(
            model=TINY_NAME, max_tokens=4, messages=CHAT, extra_body={"temperature": 3.0}
        )
    ok = oai.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def _worker_load(cluster) -> object:
    import asyncio

    from services.common.grpc_utils import insecure_channel
    from services.common.proto import worker_pb2 as pb
    from services.common.proto import worker_pb2_grpc as pb_grpc

    async def read():
        async with insecure_channel(cluster.workers[0].ready_field("address")) as ch:
            call = pb_grpc.WorkerServiceStub(ch).StreamLoad(pb.LoadReportRequest(interval_ms=50))
            report = await asyncio.wait_for(call.read(), 5)
            call.cancel()
            return report

    return asyncio.run(read())


def test_client_disconnect_aborts_and_frees_kv(cluster) -> None:
    import time

    body = {"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", cluster.base_url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        busy = _worker_load(cluster)
        assert busy.num_inflight == 1 and busy.num_running == 1
    deadline = time.monotonic() + 10
    while True:
        rep = _worker_load(cluster)
        if rep.num_inflight == 0 and rep.num_running == 0:
            break
        assert time.monotonic() < deadline, f"request still running after disconnect: {rep}"
        time.sleep(0.1)
    assert busy.kv_utilization > 0 and rep.kv_utilization < busy.kv_utilization, (busy, rep)
