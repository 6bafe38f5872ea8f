"""Structured outputs through real clusters: a chat request with a JSON schema gets valid
JSON, and a 1P+1D PD cluster (the prefill worker samples the first token under the mask, the
decode worker continues the grammar) gives the tokens of a mixed cluster."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from cluster_helpers import TINY_NAME, anthropic_client, start_cluster
from prometheus_client.parser import text_string_to_metric_families

from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "size": {"enum": ["small", "large"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "size", "count"],
    "additionalProperties": False,
}
QUESTIONS = ["Describe a box as JSON.", "Give me one item, please"]


def chat(url: str, question: str, **extra) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"model": TINY_NAME, "messages": [{"role": "user", "content": question}],
              "max_tokens": 48, "temperature": 0, "logprobs": True, **extra},
        timeout=120,
    )  # fmt: skip


def schema_chat(url: str, question: str) -> dict:
    fmt = {"type": "json_schema", "json_schema": {"name": "box", "schema": SCHEMA}}
    r = chat(url, question, response_format=fmt)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def check_valid(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"name", "size", "count"}, text
    assert isinstance(value["name"], str) and len(value["name"]) <= 8, text
    assert value["size"] in ("small", "large"), text
    assert isinstance(value["count"], int) and 0 <= value["count"] <= 99, text


@pytest.fixture(scope="module")
def mixed(llama_cluster):
    return llama_cluster  # shared with other modules (tests/conftest.py)


@pytest.fixture(scope="module")
def pd(tiny_model_dir):
    # A 1 s reservation: less than a cold prefill worker's first grammar build (llguidance's
    # tokenizer and trie, >= 1.5 s on a quiet CPU), which the decode worker's window for a
    # constrained request must leave room for (kv_receiver.GRAMMAR_BUILD_ALLOWANCE_S). Every
    # PD request of this module is constrained.
    c = start_cluster(tiny_model_dir("llama"), workers=0, prefill=1, decode=1,
                      worker_overrides={"reserve_timeout_s": 1.0})  # fmt: skip
    yield c
    c.stop()


def failures(c) -> float:
    """Requests that failed on any worker of ``c`` (a Prefill past its window counts)."""
    total = 0.0
    for w in c.workers:
        url = f"http://127.0.0.1:{w.ready_field('metrics_port')}/metrics"
        text = httpx.get(url, timeout=10, trust_env=False).text
        for family in text_string_to_metric_families(text):
            total += sum(s.value for s in family.samples
                         if s.name == "epdserve:request_failures_total")  # fmt: skip
    return total


def test_pd_json_schema_equals_mixed(mixed, pd):
    for q in QUESTIONS:
        want = schema_chat(mixed.base_url, q)
        got = schema_chat(pd.base_url, q)
        assert want["finish_reason"] == "stop", want
        check_valid(want["message"]["content"])
        assert got["message"]["content"] == want["message"]["content"], q
        assert [t["token"] for t in got["logprobs"]["content"]] == [
            t["token"] for t in want["logprobs"]["content"]
        ]
        assert got["finish_reason"] == "stop"
    # The cold prefill worker built its grammar inside the first reservation: no attempt
    # failed and was retried into a second build.
    assert failures(pd) == 0


def test_choice_and_bad_schema_in_pd(pd):
    r = chat(pd.base_url, QUESTIONS[0], structured_outputs={"choice": ["yes", "no"]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("yes", "no")
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    r = chat(pd.base_url, QUESTIONS[0], response_format=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_anthropic_output_config_equals_the_openai_schema_chat(mixed):
    # Same messages, same template, greedy: the Messages API constrained by output_config
    # gives the text the chat API gives with response_format.
    claude = anthropic_client(mixed, timeout=120)
    for q in QUESTIONS:
        want = schema_chat(mixed.base_url, q)["message"]["content"]
        msg = claude.messages.create(
            model=TINY_NAME, max_tokens=48, messages=[{"role": "user", "content": q}],
            extra_body={"temperature": 0,
                        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
        )  # fmt: skip
        assert msg.content[0].text == want and msg.stop_reason == "end_turn"
    with pytest.raises(anthropic.BadRequestError, match="output_format"):
        claude.messages.create(
            model=TINY_NAME, max_tokens=8, messages=[{"role": "user", "content": "x"}],
            extra_body={"output_format": {"type": "json_object"}},
        )  # fmt: skip
