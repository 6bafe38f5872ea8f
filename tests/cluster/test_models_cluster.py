"""Several base models on one cluster: two tiny random models of different families and
vocabularies (the default tokenizer's 49,152 tokens; a 350-token BPE with another chat
template), one mixed worker each, one router. Through the OpenAI SDK each model answers as its
offline engine does (the router tokenizes with that model's tokenizer and template, and routes
to its workers); /v1/models lists both; an unknown model is a 404."""

from __future__ import annotations

import httpx
import openai
import pytest
from cluster_helpers import TINY_ENGINE, TINY_NAME, cli, get_json, openai_client, start_cluster
from model_groups import build_other_model

from services.cli.launcher import ModelGroup
from services.engine import LLM, SamplingParams

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

OTHER_NAME = "tiny-qwen2-bpe"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "hello there"}]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return build_other_model(tmp_path_factory.mktemp("other") / "model")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, other_model):
    c = start_cluster(tiny_model_dir("llama"), workers=1,
                      more_models=[ModelGroup(str(other_model), OTHER_NAME)])  # fmt: skip
    yield c
    c.stop()


@pytest.fixture(scope="module")
def offline(tiny_model_dir, other_model) -> dict[str, LLM]:
    return {
        TINY_NAME: LLM(str(tiny_model_dir("llama")), **TINY_ENGINE),
        OTHER_NAME: LLM(str(other_model), **TINY_ENGINE),
    }


def test_models_lists_both_and_unknown_is_404(cluster) -> None:
    status, body = get_json(cluster.base_url + "/v1/models")
    assert status == 200 and {m["id"] for m in body["data"]} == {TINY_NAME, OTHER_NAME}
    with pytest.raises(openai.NotFoundError) as err:
        openai_client(cluster).completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_each_model_answers_as_its_offline_engine(cluster, offline) -> None:
    oai = openai_client(cluster)
    for name, llm in offline.items():
        ids = llm.tokenizer.encode(PROMPT)
        want = llm.generate(ids, GREEDY)[0].outputs[0]
        got = oai.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0,
                                     logprobs=1, extra_body={"ignore_eos": True})  # fmt: skip
        assert got.model == name and got.usage.prompt_tokens == len(ids)
        assert got.choices[0].text == want.text, name
        # Logprobs' token strings come from the model's own vocabulary.
        strs = [llm.tokenizer.decode([t]) for t in want.token_ids]
        assert got.choices[0].logprobs.tokens == strs, name
        chat_want = llm.chat(CHAT, GREEDY)[0]
        chat = oai.chat.completions.create(model=name, messages=CHAT, max_tokens=8,  # type: ignore[arg-type]
                                           temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        assert chat.usage.prompt_tokens == len(chat_want.prompt_token_ids), name
        assert chat.choices[0].message.content == chat_want.outputs[0].text, name
        # vLLM's /tokenize with the model's own tokenizer.
        r = httpx.post(cluster.base_url + "/tokenize", json={"model": name, "prompt": PROMPT},
                       timeout=30)  # fmt: skip
        assert r.status_code == 200 and r.json()["tokens"] == ids, name


def test_status_groups_workers_by_model(cluster) -> None:
    text = cli(cluster, "status").stdout
    assert f"model {TINY_NAME}: 1 workers" in text and f"model {OTHER_NAME}: 1 workers" in text
