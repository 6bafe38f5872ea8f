"""/v1/completions ``echo`` through the openai SDK (a fake worker, a real etcd): the prompt's
text goes before each choice's, streamed or not, for text and token-id prompts; with
``logprobs`` (which would need the prompt's logprobs) it is a clear 400. ``best_of`` other
than ``n`` and ``suffix`` are 400s the SDK raises, not silently ignored."""

from __future__ import annotations

import openai
import pytest
import pytest_asyncio
from router_fakes import FakeEngine, gateway_with_worker

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

MODEL = "fake-model"


@pytest_asyncio.fixture
async def client():
    async with gateway_with_worker("echo", FakeEngine()) as gw:
        yield openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0,
                                 timeout=10)  # fmt: skip


async def test_echo_puts_the_prompt_before_each_choice(client: openai.AsyncOpenAI) -> None:
    # Before: a 400 "'echo' is not supported".
    out = await client.completions.create(model=MODEL, prompt=["ab", "cd"], n=2, max_tokens=2,
                                          echo=True)  # fmt: skip
    assert [c.text for c in out.choices] == ["abw0 w1 "] * 2 + ["cdw0 w1 "] * 2
    assert out.usage is not None and out.usage.prompt_tokens == 4  # the echo is not counted
    out = await client.completions.create(model=MODEL, prompt=[104, 105], max_tokens=1, echo=True)
    assert out.choices[0].text == "hiw0 "
    texts: dict[int, str] = {}
    stream = await client.completions.create(model=MODEL, prompt="xy", n=2, max_tokens=3,
                                             echo=True, stream=True)  # fmt: skip
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {0: "xyw0 w1 w2 ", 1: "xyw0 w1 w2 "}
    plain = await client.completions.create(model=MODEL, prompt="xy", max_tokens=1)
    assert plain.choices[0].text == "w0 "


async def test_fields_not_implemented_are_400s(client: openai.AsyncOpenAI) -> None:
    # Before: best_of, suffix and an empty stop string answered 200 as if absent.
    cases = [({"echo": True, "logprobs": 2}, "echo"), ({"best_of": 3}, "best_of"),
             ({"suffix": "}"}, "suffix"), ({"stop": [""]}, "stop")]  # fmt: skip
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=1, **extra)
        assert err.value.body["param"] == param
