"""The token-counting endpoints over in-process fake workers: Anthropic's
/v1/messages/count_tokens (equal to the prompt a worker receives for the same /v1/messages
body) and vLLM's /tokenize and /detokenize; their errors and request metrics."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest
import pytest_asyncio
from router_fakes import FakeEngine, start_fake_worker, start_gateway, until_healthy

from tests.conftest import image_bytes
from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

MODEL = "fake-model"
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
USER = [{"role": "user", "content": "Weather in Paris?"}]


class RecordingEngine(FakeEngine):
    """A FakeEngine that keeps the prompt of each request it runs."""

    def __init__(self) -> None:
        super().__init__(max_model_len=8192)  # the fake tokenizer makes a token per character
        self.prompts: list[list[int]] = []

    async def generate(self, request_id, prompt_token_ids, params, resume=None, lora=None):
        self.prompts.append(list(prompt_token_ids))
        async for out in super().generate(request_id, prompt_token_ids, params, resume):
            yield out


class PassImages:
    """Stands in for a worker's ImageLoader: the engine gets the router's expanded ids."""

    async def prompt(self, ids, images):
        return ids


_n = 0


async def _env(etcd, tokenizer=None, **router):
    global _n
    _n += 1
    cluster = f"count{_n}"
    engine = RecordingEngine()
    worker = await start_fake_worker(etcd.endpoint, cluster, "w1", engine=engine)
    worker.servicer.images = PassImages()  # type: ignore[assignment]
    gw = await start_gateway(etcd.endpoint, cluster, tokenizer=tokenizer, **router)
    client = httpx.AsyncClient(base_url=gw.url, timeout=10)
    await until_healthy(client)
    return client, engine, gw, worker


async def _close(client, gw, worker) -> None:
    await client.aclose()
    await asyncio.wait_for(gw.stop(), 15)
    await asyncio.wait_for(worker.stop(), 15)


@pytest_asyncio.fixture
async def env(etcd):
    client, engine, gw, worker = await _env(etcd)
    yield client, engine, gw
    await _close(client, gw, worker)


def _requests(gw, api: str, outcome: str) -> float:
    return gw.gateway.metrics.requests.labels(api, outcome)._value.get()


async def _count_and_generate(client, engine, body: dict[str, Any]) -> tuple[int, int, int]:
    """(count_tokens' input_tokens, the prompt length the worker got, usage.input_tokens)."""
    r = await client.post("/v1/messages/count_tokens", json=body)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"input_tokens"}
    counted = r.json()["input_tokens"]
    r = await client.post("/v1/messages", json={**body, "max_tokens": 2})
    assert r.status_code == 200, r.text
    return counted, len(engine.prompts[-1]), r.json()["usage"]["input_tokens"]


ANTHROPIC_BODIES = {
    "text": {"messages": USER},
    "system": {"system": "Be brief.", "messages": USER},
    "system_blocks": {"system": [{"type": "text", "text": "Be brief."}], "messages": USER},
    "tools": {"system": "Be brief.", "messages": USER, "tools": [WEATHER]},
    "tool_history": {
        "tools": [WEATHER],
        "tool_choice": {"type": "auto"},
        "messages": USER + [
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "22 C"},
                {"type": "text", "text": "And tomorrow?"}]},
        ],
    },
}  # fmt: skip


@pytest.mark.parametrize("case", list(ANTHROPIC_BODIES))
async def test_count_tokens_equals_the_prompt_the_worker_gets(env, case: str) -> None:
    client, engine, _ = env
    body = {"model": MODEL, **ANTHROPIC_BODIES[case]}
    counted, received, usage = await _count_and_generate(client, engine, body)
    assert counted == received == usage


async def test_count_tokens_counts_system_and_tools(env) -> None:
    client, _, gw = env

    async def count(**fields: Any) -> int:
        r = await client.post("/v1/messages/count_tokens",
                              json={"model": MODEL, "messages": USER, **fields})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["input_tokens"]

    plain = await count()
    assert plain == len("<user>Weather in Paris?<assistant>")  # the fake template
    assert await count(system="Be brief.") == plain + len("<system>Be brief.")
    with_tools = await count(tools=[WEATHER])
    assert with_tools > plain + len(WEATHER["description"])  # the tools' system prompt
    # tool_choice "none" leaves the tools out of the prompt, as /v1/messages does
    assert await count(tools=[WEATHER], tool_choice={"type": "none"}) == plain
    # no max_tokens needed, and a prompt past the context length is still counted
    assert await count(system="x" * 9000) == plain + len("<system>") + 9000
    assert _requests(gw, "count_tokens", "success") == 5


async def test_count_tokens_errors_are_anthropic_errors(env) -> None:
    client, _, gw = env
    url = "/v1/messages/count_tokens"
    png = base64.b64encode(image_bytes(20, 20, 0)).decode()
    cases = [
        ({"model": "nope", "messages": USER}, 404, "not_found_error"),
        ({"messages": USER}, 400, "invalid_request_error"),
        ({"model": MODEL, "messages": []}, 400, "invalid_request_error"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
         "invalid_request_error"),
        ({"model": MODEL, "messages": USER, "tools": [{"name": "bad name!"}]}, 400,
         "invalid_request_error"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": png}}]}]}, 400, "invalid_request_error"),
    ]  # fmt: skip
    for body, status, kind in cases:
        r = await client.post(url, json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind, r.text
    r = await client.post(url, content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert _requests(gw, "count_tokens", "invalid") == len(cases) + 1


async def test_endpoints_need_the_api_key(etcd, monkeypatch) -> None:
    monkeypatch.setenv("EPDSERVE_API_KEYS", "sk-count")
    client, _, gw, worker = await _env(etcd)
    try:
        body = {"model": MODEL, "messages": USER}
        r = await client.post("/v1/messages/count_tokens", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = await client.post("/tokenize", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["message"]
        r = await client.post("/detokenize", json={"model": MODEL, "tokens": [104]})
        assert r.status_code == 401
        r = await client.post("/v1/messages/count_tokens", json=body,
                              headers={"x-api-key": "sk-count"})  # fmt: skip
        assert r.status_code == 200, r.text
        r = await client.post("/tokenize", json={"model": MODEL, "prompt": "hi"},
                              headers={"Authorization": "Bearer sk-count"})  # fmt: skip
        assert r.status_code == 200 and r.json()["tokens"] == [104, 105]
    finally:
        await _close(client, gw, worker)


# -- vLLM's /tokenize and /detokenize -------------------------------------------------------


async def test_tokenize_prompt_and_detokenize_round_trip(env) -> None:
    client, _, gw = env
    text = "Hello, wörld"
    r = await client.post("/tokenize", json={"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"count": len(text), "max_model_len": 8192, "tokens": [ord(c) for c in text]}
    r = await client.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    # token strings on request; the model may be left out when the cluster serves one
    r = await client.post("/tokenize", json={"prompt": "ab", "return_token_strs": True})
    assert r.json()["token_strs"] == ["a", "b"] and r.json()["tokens"] == [97, 98]
    r = await client.post("/detokenize", json={"tokens": []})
    assert r.json() == {"prompt": ""}
    assert _requests(gw, "tokenize", "success") == 2
    assert _requests(gw, "detokenize", "success") == 2


async def test_tokenize_messages_equals_chat_prompt_tokens(env) -> None:
    client, engine, _ = env
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": WEATHER["input_schema"]}}  # fmt: skip
    msgs = [{"role": "system", "content": "Be brief."}, *USER]
    counts = []
    for extra in ({}, {"tools": [tool]}):
        r = await client.post("/tokenize", json={"model": MODEL, "messages": msgs, **extra})
        assert r.status_code == 200, r.text
        tokenized = r.json()
        r = await client.post("/v1/chat/completions",
                              json={"model": MODEL, "messages": msgs, "max_tokens": 2, **extra})  # fmt: skip
        assert r.status_code == 200, r.text
        assert tokenized["count"] == r.json()["usage"]["prompt_tokens"] == len(engine.prompts[-1])
        assert tokenized["tokens"] == engine.prompts[-1]
        counts.append(tokenized["count"])
    assert counts[1] > counts[0]  # the tools are in the prompt
    r = await client.post("/tokenize", json={"model": MODEL, "messages": msgs,
                                             "add_generation_prompt": False})  # fmt: skip
    assert r.json()["count"] == counts[0] - len("<assistant>")
    # vLLM's chat_template_kwargs: template variables, in both (they were ignored).
    kwargs = {"model": MODEL, "messages": msgs, "chat_template_kwargs": {"enable_thinking": False}}
    r = await client.post("/tokenize", json=kwargs)
    assert r.status_code == 200 and r.json()["count"] == counts[0] + len("<enable_thinking=False>")
    r = await client.post("/v1/chat/completions", json={**kwargs, "max_tokens": 2})
    assert r.status_code == 200 and len(engine.prompts[-1]) == counts[0] + len(
        "<enable_thinking=False>"
    )
    # The chat API renders it as /tokenize does (vLLM's extension; it was ignored).
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs,
                          "max_tokens": 2, "add_generation_prompt": False})  # fmt: skip
    assert r.status_code == 200 and len(engine.prompts[-1]) == counts[0] - len("<assistant>")


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"model": MODEL}, 400, "prompt"),
        ("/tokenize", {"model": MODEL, "prompt": 5}, 400, "prompt"),
        ("/tokenize", {"model": MODEL, "prompt": "x", "messages": USER}, 400, None),
        ("/tokenize", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/tokenize", {"model": MODEL, "messages": USER, "continue_final_message": True}, 400,
         "continue_final_message"),
        ("/tokenize", {"model": MODEL, "messages": USER, "tools": "x"}, 400, "tools"),
        ("/tokenize", {"model": MODEL, "messages": USER, "chat_template": "{{ 1 }}"}, 400,
         "chat_template"),
        ("/tokenize", {"model": MODEL, "messages": USER, "chat_template_kwargs": "x"}, 400,
         "chat_template_kwargs"),
        ("/tokenize", {"model": MODEL, "messages": USER,
                       "chat_template_kwargs": {"tools": []}}, 400, "chat_template_kwargs"),
        ("/tokenize", {"model": MODEL, "messages": USER,
                       "chat_template_kwargs": {"self": 1}}, 400, "chat_template_kwargs"),
        ("/tokenize", {"model": MODEL, "messages": USER,
                       "chat_template_kwargs": {"conversations": 1}}, 400, "chat_template_kwargs"),
        ("/tokenize", {"model": MODEL, "prompt": "x", "return_token_strs": "yes"}, 400,
         "return_token_strs"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
        ("/detokenize", {"model": MODEL}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": "abc"}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [1000]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [2**70]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [1.5]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [True]}, 400, "tokens"),
    ],
)  # fmt: skip
async def test_tokenize_errors_are_openai_errors(env, path, body, status, param) -> None:
    client, _, gw = env
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param
    assert _requests(gw, path.strip("/"), "invalid") == 1


async def test_without_workers_is_503(etcd) -> None:
    gw = await start_gateway(etcd.endpoint, "count-empty")
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            r = await c.post("/tokenize", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_workers"
            r = await c.post("/detokenize", json={"model": MODEL, "tokens": [1]})
            assert r.status_code == 503
            r = await c.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": USER})
            assert r.status_code == 503 and r.json()["type"] == "error"
    finally:
        await gw.stop()


# -- With the real tokenizer of a vision-language model -------------------------------------


@pytest_asyncio.fixture
async def vl_env(etcd, tiny_vl_model_dir):
    from services.router.tokenization import Tokenizer

    tok = Tokenizer.load(str(tiny_vl_model_dir))
    client, engine, gw, worker = await _env(etcd, tokenizer=tok)
    yield client, engine, tok
    await _close(client, gw, worker)


async def test_count_tokens_with_an_image_counts_its_placeholders(vl_env) -> None:
    client, engine, tok = vl_env
    png = base64.b64encode(image_bytes(56, 84, 7)).decode()  # 6 image tokens
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": png}}  # fmt: skip
    text = {"type": "text", "text": "What is this?"}
    body = {"model": MODEL, "system": "Be brief.",
            "messages": [{"role": "user", "content": [text, image]}]}  # fmt: skip
    counted, received, usage = await _count_and_generate(client, engine, body)
    assert counted == received == usage
    assert engine.prompts[-1].count(tok.vision.image_token_id) == 6
    plain = {**body, "messages": [{"role": "user", "content": [text]}]}
    assert (await _count_and_generate(client, engine, plain))[0] == counted - 6 - 2  # +start/end
    # An image a tool returned (a tool_result block's content): a 400 before; now in the
    # prompt where the result is, like a user's image.
    use = {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "screenshot", "input": {}}]}  # fmt: skip
    for content in ([text, image], [text]):
        result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": content}
        turns = [{"role": "user", "content": [text]}, use, {"role": "user", "content": [result]}]
        counted, received, usage = await _count_and_generate(client, engine,
                                                             {**body, "messages": turns})  # fmt: skip
        assert counted == received == usage
        assert engine.prompts[-1].count(tok.vision.image_token_id) == 6 * (image in content)
        if image in content:
            with_image = counted
    assert counted == with_image - 6 - 2


async def test_real_tokenizer_tokenize_round_trip_and_vocab_bound(vl_env) -> None:
    client, _, tok = vl_env
    text = "The capital of France is Paris."
    r = await client.post("/tokenize", json={"model": MODEL, "prompt": text,
                                             "add_special_tokens": False,
                                             "return_token_strs": True})  # fmt: skip
    body = r.json()
    assert body["tokens"] == tok.hf.encode(text, add_special_tokens=False)
    assert body["token_strs"] == tok.hf.convert_ids_to_tokens(body["tokens"])
    r = await client.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.json() == {"prompt": text}
    last = len(tok.hf) - 1  # the added vision tokens are ids too
    r = await client.post("/detokenize", json={"model": MODEL, "tokens": [last]})
    assert r.status_code == 200 and r.json()["prompt"] == tok.hf.decode([last])
    r = await client.post("/detokenize", json={"model": MODEL, "tokens": [last + 1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


async def test_completion_token_ids_outside_the_vocabulary_are_400(env) -> None:
    client, engine, _ = env
    for prompt in ([2**31], [[104, 1000]], [-1], [[104, True]]):
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompt"
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [104, 999],
                                                   "max_tokens": 1})  # fmt: skip
    assert r.status_code == 200 and engine.prompts[-1] == [104, 999]


async def test_model_may_be_left_out_only_with_one_model(etcd) -> None:
    client, _, gw, worker = await _env(etcd)
    other = await start_fake_worker(etcd.endpoint, gw.gateway.cfg.cluster, "w2",
                                    engine=FakeEngine(model_name="other", max_model_len=64))  # fmt: skip
    try:
        await until(lambda: len(gw.gateway.pool.models()) == 2, what="both models listed")
        r = await client.post("/tokenize", json={"prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = await client.post("/tokenize", json={"model": "other", "prompt": "x"})
        assert r.status_code == 200 and r.json()["max_model_len"] == 64
    finally:
        await asyncio.wait_for(other.stop(), 15)
        await _close(client, gw, worker)
