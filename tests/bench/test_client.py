"""The streaming client against canned server replies (httpx.MockTransport: no sockets)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from services.bench.client import build_payload, chunk_text, first_model, send_request
from services.bench.config import BenchConfig
from services.bench.messages import SampleRequest

BASE = "http://127.0.0.1:9"


def sse(*objs: object, done: bool = True) -> bytes:
    text = "".join(f"data: {json.dumps(o)}\n\n" for o in objs)
    return (text + ("data: [DONE]\n\n" if done else "")).encode()


def completion_chunk(text: str) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}


def usage_chunk(prompt: int, completion: int, cached: int | None = None) -> dict:
    usage: dict = {"prompt_tokens": prompt, "completion_tokens": completion}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {"choices": [], "usage": usage}


def run(cfg: BenchConfig, handler, req: SampleRequest | None = None):
    req = req or SampleRequest("hello there", 2, 4)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, cfg, "m", req)

    return asyncio.run(go())


def test_payload_completions() -> None:
    cfg = BenchConfig(base_url=BASE)
    body = build_payload(cfg, "m", SampleRequest("hi", 1, 7, system="sys", group=0))
    assert body == {
        "model": "m", "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}, "prompt": "sys\n\nhi", "max_tokens": 7,
        "ignore_eos": True, "min_tokens": 7,
    }  # fmt: skip


def test_payload_chat_and_no_ignore_eos() -> None:
    cfg = BenchConfig(base_url=BASE + "/v1/", endpoint="chat", ignore_eos=False, temperature=0.5)
    assert cfg.url == BASE + "/v1/chat/completions"
    body = build_payload(cfg, "m", SampleRequest("hi", 1, 3, system="sys", group=1))
    assert body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
    ]
    assert body["max_completion_tokens"] == 3 and body["temperature"] == 0.5
    assert "ignore_eos" not in body and "min_tokens" not in body


def test_chunk_text() -> None:
    assert chunk_text(completion_chunk("ab")) == "ab"
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert chunk_text({"choices": [{"delta": {"content": "x"}}]}) == "x"
    assert chunk_text(usage_chunk(1, 2)) == ""


def test_stream_timings_and_usage() -> None:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["body"] = json.loads(request.content)
        chunks = [completion_chunk(""), completion_chunk("a"), completion_chunk("b"),
                  completion_chunk(""), completion_chunk("cd"), usage_chunk(2, 4, cached=1)]  # fmt: skip
        return httpx.Response(200, content=sse(*chunks))

    r = run(BenchConfig(base_url=BASE), handler)
    assert r.success, r.error
    assert seen["url"] == BASE + "/v1/completions" and seen["body"]["stream"] is True
    assert r.generated_text == "abcd"
    assert r.chunks == 3 and len(r.itl) == 2  # empty chunks count for neither TTFT nor ITL
    assert r.output_tokens == 4 and r.usage_reported and r.server_prompt_tokens == 2
    assert r.cached_tokens == 1
    assert 0 < r.ttft <= r.latency and r.end >= r.start + r.latency
    assert r.tpot == pytest.approx((r.latency - r.ttft) / 3)


def test_without_usage_falls_back_to_chunks() -> None:
    r = run(BenchConfig(base_url=BASE),
            lambda _: httpx.Response(200, content=sse(completion_chunk("a"), completion_chunk("b"))))  # fmt: skip
    assert r.success and not r.usage_reported and r.output_tokens == 2


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(400, json={"error": {"message": "too long"}}), "HTTP 400: "),
        (httpx.Response(200, content=sse({"error": {"message": "worker died"}})), "stream error"),
        (httpx.Response(200, content=sse(completion_chunk("a"), done=False)), "without [DONE]"),
        (httpx.Response(200, content=sse(usage_chunk(1, 0))), "no tokens"),
        (httpx.Response(200, content=b"data: {not json\n\n"), "JSONDecodeError"),
        (httpx.Response(200, content=b"data: [1, 2]\n\n"), "not a JSON object"),
    ],
)
def test_failures_are_reported_not_raised(response: httpx.Response, error: str) -> None:
    r = run(BenchConfig(base_url=BASE), lambda _: response)
    assert not r.success and error in r.error
    assert r.end >= r.start


def test_transport_error_and_timeout() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    r = run(BenchConfig(base_url=BASE), refuse)
    assert not r.success and r.error.startswith("ConnectError")

    async def slow_stream():
        yield b'data: {"choices": [{"text": "a"}]}\n\n'
        await asyncio.sleep(5)
        yield b"data: [DONE]\n\n"

    r = run(
        BenchConfig(base_url=BASE, timeout_s=0.2),
        lambda _: httpx.Response(200, content=slow_stream()),
    )
    assert not r.success and r.error == "timeout after 0.2s"


def test_first_model() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return httpx.Response(200, json={"data": [{"id": "first"}, {"id": "second"}]})

    async def go(h):
        async with httpx.AsyncClient(transport=httpx.MockTransport(h)) as client:
            return await first_model(client, BASE)

    assert asyncio.run(go(handler)) == "first"
    with pytest.raises(ValueError, match="lists no model"):
        asyncio.run(go(lambda _: httpx.Response(200, json={"data": []})))
