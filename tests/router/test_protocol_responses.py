"""What the gateway sends matches the response models that /openapi.json documents: real
responses of each endpoint (over a fake worker and a real etcd) validate against them, with
no field the models do not know."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import pytest_asyncio
from pydantic import BaseModel
from router_fakes import gateway_with_worker

from services.router.api.protocol.anthropic import CountTokensResponse, MessageResponse
from services.router.api.protocol.common import AnthropicError, OpenAIError
from services.router.api.protocol.openai_replies import ChatCompletion, Completion, ModelList
from services.router.api.protocol.responses import ResponseObject
from services.router.api.protocol.tokenize import DetokenizeResponse, TokenizeResponse

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

MODEL = "fake-model"
MSGS = [{"role": "user", "content": "hi"}]


@pytest_asyncio.fixture
async def client():
    async with (
        gateway_with_worker("resp") as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=10) as c,
    ):
        yield c


CASES: list[tuple[str, dict[str, Any], int, type[BaseModel]]] = [
    ("/v1/chat/completions", {"model": MODEL, "messages": MSGS, "max_tokens": 3,
                              "logprobs": True, "top_logprobs": 1}, 200, ChatCompletion),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2, "n": 2,
                         "logprobs": 1}, 200, Completion),
    ("/v1/messages", {"model": MODEL, "max_tokens": 3, "messages": MSGS, "stop_sequences": ["w1"]},
     200, MessageResponse),
    ("/v1/messages/count_tokens", {"model": MODEL, "messages": MSGS}, 200, CountTokensResponse),
    ("/tokenize", {"prompt": "hi", "return_token_strs": True}, 200, TokenizeResponse),
    ("/tokenize", {"messages": MSGS}, 200, TokenizeResponse),
    ("/detokenize", {"tokens": [104, 105]}, 200, DetokenizeResponse),
    ("/v1/responses", {"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}], "max_output_tokens": 3}, 200, ResponseObject),
    ("/v1/responses", {"model": MODEL, "input": []}, 400, OpenAIError),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, OpenAIError),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, OpenAIError),
    ("/v1/messages", {"model": MODEL, "messages": MSGS}, 400, AnthropicError),
    ("/v1/messages/count_tokens", {"model": "nope", "messages": MSGS}, 404, AnthropicError),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "model"), CASES)
async def test_response_matches_its_model(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], status: int,
    model: type[BaseModel],
) -> None:  # fmt: skip
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    model.model_validate(r.json())


async def test_model_list_matches_its_model(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200 and ModelList.model_validate(r.json()).data
