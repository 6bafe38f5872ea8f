"""The HTTP gateway over in-process fake workers and a real etcd: API shapes and errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import pytest_asyncio
from router_fakes import FakeEngine, start_fake_worker, start_gateway

from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


_n = 0


def _cluster() -> str:
    global _n
    _n += 1
    return f"gw{_n}"


async def _wait_healthy(client: httpx.AsyncClient, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if (await client.get("/health")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("gateway never became healthy")


@pytest_asyncio.fixture
async def env(etcd):
    cluster = _cluster()
    worker = await start_fake_worker(etcd.endpoint, cluster, "w1")
    gw = await start_gateway(etcd.endpoint, cluster)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        await _wait_healthy(client)
        yield client, worker, gw
    # Bounded, so that a hang in shutdown names itself instead of eating the test timeout.
    await asyncio.wait_for(gw.stop(), 15)
    await asyncio.wait_for(worker.stop(), 15)


def _sse(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


async def test_no_workers_is_503_in_each_format(etcd) -> None:
    gw = await start_gateway(etcd.endpoint, _cluster())
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            assert (await c.get("/health")).status_code == 503
            r = await c.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 503 and r.json()["error"]["message"]
            assert r.headers["retry-after"] == "1"  # a 503 says when to come back
            r = await c.post(
                "/v1/messages",
                json={
                    "model": "m",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "x"}],
                },
            )
            assert r.status_code == 503 and r.json()["type"] == "error"
            assert r.headers["retry-after"] == "1"
            assert (await c.get("/v1/models")).json()["data"] == []
    finally:
        await gw.stop()


async def test_chat_non_stream(env) -> None:
    client, _, _ = env
    r = await client.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
    })  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model" and isinstance(body["created"], int)
    ch = body["choices"][0]
    assert ch["message"] == {"role": "assistant", "content": "w0 w1 w2 "}
    assert ch["finish_reason"] == "length"
    u = body["usage"]
    assert u["completion_tokens"] == 3 and u["prompt_tokens"] == len("<user>hello<assistant>")
    assert u["total_tokens"] == u["prompt_tokens"] + 3


async def test_chat_stream_with_usage_n_and_logprobs(env) -> None:
    client, _, _ = env
    r = await client.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
        "stream": True, "stream_options": {"include_usage": True}, "n": 2, "logprobs": True,
        "top_logprobs": 1,
    })  # fmt: skip
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    chunks = _sse(r.text)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    text = {0: "", 1: ""}
    finish = {}
    for c in chunks[:-1]:
        for ch in c["choices"]:
            text[ch["index"]] += ch["delta"].get("content", "")
            if ch["finish_reason"]:
                finish[ch["index"]] = ch["finish_reason"]
            if ch["delta"].get("content"):
                assert ch["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] == pytest.approx(
                    -0.1
                )
    assert text == {0: "w0 w1 ", 1: "w0 w1 "} and finish == {0: "length", 1: "length"}


async def test_completions_stop_and_multi_prompt(env) -> None:
    client, _, _ = env
    r = await client.post("/v1/completions", json={
        "model": "fake-model", "prompt": ["ab", "cd"], "max_tokens": 5, "stop": ["w2"],
    })  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        assert c["text"] == "w0 w1 " and c["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 4


async def test_anthropic_messages(env) -> None:
    client, _, _ = env
    req = {"model": "fake-model", "max_tokens": 4, "system": "be brief",
           "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
           "stop_sequences": ["w3"]}  # fmt: skip
    r = await client.post("/v1/messages", json=req)
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["type"] == "message" and b["content"][0]["text"] == "w0 w1 w2 "
    assert b["stop_reason"] == "stop_sequence" and b["stop_sequence"] == "w3"
    assert b["usage"]["output_tokens"] == 4
    r = await client.post("/v1/messages", json={**req, "stream": True})
    events = [ln[7:] for ln in r.text.splitlines() if ln.startswith("event: ")]
    assert events[0] == "message_start" and events[1] == "content_block_start"
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    delta = [json.loads(ln[6:]) for ln in r.text.splitlines() if '"message_delta"' in ln][0]
    assert delta["delta"]["stop_reason"] == "stop_sequence"


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", b"{not json", 400),
        ("/v1/chat/completions", b"[1, 2]", 400),
        ("/v1/chat/completions", {"model": "fake-model"}, 400),
        ("/v1/chat/completions", {"model": "fake-model", "messages": "hi"}, 400),
        ("/v1/chat/completions", {"model": 3, "messages": [{"role": "user", "content": "x"}]}, 400),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
        ("/v1/chat/completions", {"model": "fake-model", "max_tokens": "5",
                                  "messages": [{"role": "user", "content": "x"}]}, 400),
        ("/v1/chat/completions", {"model": "fake-model", "temperature": 9,
                                  "messages": [{"role": "user", "content": "x"}]}, 400),
        ("/v1/chat/completions", {"model": "fake-model", "max_tokens": 1000,
                                  "messages": [{"role": "user", "content": "x"}]}, 400),
        ("/v1/completions", {"model": "fake-model"}, 400),
        ("/v1/completions", {"model": "fake-model", "prompt": "x" * 200}, 400),
        ("/v1/messages", {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}, 400),
        ("/v1/messages", {"model": "nope", "max_tokens": 3,
                          "messages": [{"role": "user", "content": "x"}]}, 404),
        ("/v1/messages", b"{", 400),
    ],
)  # fmt: skip
async def test_bad_inputs(env, path: str, body, status: int) -> None:
    client, _, _ = env
    if isinstance(body, bytes):
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    j = r.json()
    if path == "/v1/messages":
        assert j["type"] == "error" and j["error"]["message"]
    else:
        assert j["error"]["message"] and j["error"]["type"]
    if status == 400 and "max_tokens" in str(body) and "1000" in str(body):
        assert j["error"]["code"] == "context_length_exceeded"
    # and the server keeps serving
    ok = await client.post(
        "/v1/completions", json={"model": "fake-model", "prompt": "a", "max_tokens": 1}
    )
    assert ok.status_code == 200


async def test_client_disconnect_aborts_on_worker(env) -> None:
    client, worker, _ = env
    worker.engine.step_s = 0.05
    req = {"model": "fake-model", "prompt": "a", "max_tokens": 100, "stream": True}
    async with client.stream("POST", "/v1/completions", json=req) as r:
        async for _line in r.aiter_lines():
            break
    for _ in range(100):
        if worker.engine.aborted:
            break
        await asyncio.sleep(0.05)
    assert worker.engine.aborted, "the worker never saw the abort"
    assert not worker.servicer.state.inflight


async def test_non_stream_disconnect_aborts_on_worker(env) -> None:
    client, worker, _ = env
    worker.engine.step_s = 0.05
    req = {"model": "fake-model", "prompt": "a", "max_tokens": 100}
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/completions", json=req, timeout=0.5)
    for _ in range(100):
        if worker.engine.aborted:
            break
        await asyncio.sleep(0.05)
    assert worker.engine.aborted


async def test_two_workers_failover(etcd) -> None:
    cluster = _cluster()
    w1 = await start_fake_worker(etcd.endpoint, cluster, "w1", FakeEngine())
    w2 = await start_fake_worker(etcd.endpoint, cluster, "w2", FakeEngine())
    gw = await start_gateway(etcd.endpoint, cluster, policy="round_robin")
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            await until(lambda: len(gw.gateway.pool.candidates()) == 2, what="two usable workers")
            req = {"model": "fake-model", "prompt": "a", "max_tokens": 1}
            for _ in range(4):
                assert (await c.post("/v1/completions", json=req)).status_code == 200
            assert w1.engine.started and w2.engine.started  # round robin used both
            await w1.server.stop(grace=None)  # dies without deregistering
            n2 = len(w2.engine.started)
            for _ in range(6):
                assert (await c.post("/v1/completions", json=req)).status_code == 200
            assert len(w2.engine.started) == n2 + 6
            await w1.registrar.stop(deregister=False)
            for _ in range(100):  # the lease expires and the worker leaves the view
                if "w1" not in gw.gateway.pool.handles:
                    break
                await asyncio.sleep(0.1)
            assert "w1" not in gw.gateway.pool.handles
    finally:
        await gw.stop()
        await w2.stop()


async def test_only_mixed_workers_serve_for_now(etcd) -> None:
    cluster = _cluster()
    w = await start_fake_worker(etcd.endpoint, cluster, "p1")
    w.servicer.state.role = "prefill"
    w.registrar.update(role="prefill", role_epoch=2)
    gw = await start_gateway(etcd.endpoint, cluster)
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            for _ in range(100):
                h = gw.gateway.pool.handles.get("p1")
                # The role update reaches etcd after registration: wait for both.
                if h is not None and h.load and h.info.role == "prefill":
                    break
                await asyncio.sleep(0.05)
            assert gw.gateway.pool.handles["p1"].info.role == "prefill"
            assert (await c.get("/health")).status_code == 503
            r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "a"})
            assert r.status_code == 503 and "no usable worker" in r.json()["error"]["message"]
    finally:
        await gw.stop()
        await w.stop()


async def test_pooling_apis_refuse_a_generative_model(env) -> None:
    client, _, _ = env
    for path, body in [
        ("/v1/embeddings", {"input": "hello"}),
        ("/v1/rerank", {"query": "q", "documents": ["a"]}),
        ("/v1/score", {"text_1": "a", "text_2": "b"}),
    ]:
        r = await client.post(path, json={"model": "fake-model", **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "it is a generative model" in err["message"] and err["param"] == "model"
        # How to serve one: `epdserve up` takes the worker's --pooling as an engine setting.
        assert "--engine-arg pooling=embed" in err["message"], err
