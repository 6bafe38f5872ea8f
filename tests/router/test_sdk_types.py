"""What the gateway sends validates against the official SDKs' own pydantic types (openai,
anthropic), strictly (``model_validate``: a missing or mis-typed field fails; the SDKs
themselves build objects without checking), over a fake worker and a real etcd; paths and
methods the gateway lacks answer JSON errors the SDKs parse."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
import pytest_asyncio
from anthropic import types as at
from openai.types import Model
from openai.types.responses import Response as OpenAIResponse
from router_fakes import FakeEngine, gateway_with_worker

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

MODEL = "fake-model"
CACHED = 2  # prompt tokens the fake engine says it read from its prefix cache


class CachingEngine(FakeEngine):
    async def generate(self, request_id, prompt_token_ids, params, resume=None, lora=None):
        async for out in super().generate(request_id, prompt_token_ids, params, resume, lora):
            out.num_cached_tokens = CACHED
            yield out


@pytest_asyncio.fixture
async def url():
    async with gateway_with_worker("sdk", CachingEngine()) as gw:
        yield gw.url


def _clients(url: str) -> tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]:
    oc = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=10)
    ac = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0, timeout=10)
    return oc, ac


async def test_models_answer_both_sdks(url: str) -> None:
    oc, ac = _clients(url)
    # Before: GET /v1/models/{id} was a plain-text 404, and the list lacked Anthropic's
    # ModelInfo fields (type, display_name, created_at, lifecycle).
    listed = json.loads((await oc.models.with_raw_response.list()).http_response.text)
    assert [Model.model_validate(m).id for m in listed["data"]] == [MODEL]
    listed = json.loads((await ac.models.with_raw_response.list()).http_response.text)
    assert [at.ModelInfo.model_validate(m).id for m in listed["data"]] == [MODEL]
    assert listed["has_more"] is False and listed["first_id"] == listed["last_id"] == MODEL
    raw = await oc.models.with_raw_response.retrieve(MODEL)
    assert Model.model_validate(json.loads(raw.http_response.text)).id == MODEL
    raw = await ac.models.with_raw_response.retrieve(MODEL)
    info = at.ModelInfo.model_validate(json.loads(raw.http_response.text))
    assert info.display_name == MODEL and info.created_at.year >= 2025
    with pytest.raises(openai.NotFoundError) as oerr:
        await oc.models.retrieve("nope")
    assert oerr.value.body["code"] == "model_not_found"
    with pytest.raises(anthropic.NotFoundError) as aerr:
        await ac.models.retrieve("nope")
    assert aerr.value.body["error"]["type"] == "not_found_error"


async def test_unknown_paths_are_json_errors(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        r = await c.get("/v1/nothing-here")
        assert r.status_code == 404
        assert r.json()["error"]["message"] == "Invalid URL (GET /v1/nothing-here)"
        r = await c.get("/v1/chat/completions")
        assert r.status_code == 405 and "POST" in r.headers["allow"]
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = await c.post("/v1/nothing-here", headers={"anthropic-version": "2023-06-01"})
        assert r.status_code == 404 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "not_found_error"


async def test_usage_as_each_sdk_types_it(url: str) -> None:
    oc, ac = _clients(url)
    raw = await oc.responses.with_raw_response.create(model=MODEL, input="hi",
                                                      max_output_tokens=3)  # fmt: skip
    # Before: input_tokens_details lacked cache_write_tokens (required by openai 3.x).
    resp = OpenAIResponse.model_validate(json.loads(raw.http_response.text))
    assert resp.usage.input_tokens_details.cached_tokens == CACHED
    chat = await oc.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    prompt = chat.usage.prompt_tokens
    assert chat.usage.prompt_tokens_details.cached_tokens == CACHED
    raw = await ac.messages.with_raw_response.create(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}]
    )
    msg = at.Message.model_validate(json.loads(raw.http_response.text))
    # Anthropic's input_tokens leaves out cache reads (before: the whole prompt, so a
    # client adding the three input fields counted the cached tokens twice).
    assert msg.usage.cache_read_input_tokens == CACHED
    assert msg.usage.input_tokens == prompt - CACHED
    counted = await ac.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert counted.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    async with ac.messages.stream(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}]
    ) as s:
        start = [e async for e in s if e.type == "message_start"][0]
    assert start.message.usage.input_tokens == prompt - CACHED
