"""Every API's numeric, list and string parameters at their extremes, through the official
SDKs, against a real cluster (etcd, one worker, a router: the shared ``llama_cluster``).

A request may fail, a worker may not: each case gets its expected status (a 400 in its API's
own error format, naming the parameter where the router knows it), and after each one the
worker and router processes are the same live ones and a normal greedy request answers with
the tokens it gave before the sweep. Non-finite numbers (which Python's json writes and the
SDKs refuse to send) and lone UTF-16 surrogates (which they cannot encode) go out as raw HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest
from cluster_helpers import TINY_NAME, anthropic_client, openai_client

# Real processes (the shared cluster): the sweep itself takes ~10 s on an idle machine.
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

NAN, INF = float("nan"), float("inf")
USER = [{"role": "user", "content": "hi"}]
# The smallest valid body of each API; a case's fields are laid over it.
BASE: dict[str, tuple[str, dict[str, Any]]] = {
    "completions": ("/v1/completions", {"model": TINY_NAME, "prompt": "hi", "max_tokens": 2}),
    "chat": ("/v1/chat/completions", {"model": TINY_NAME, "messages": USER, "max_tokens": 2}),
    "responses": ("/v1/responses", {"model": TINY_NAME, "input": "hi", "max_output_tokens": 2}),
    "embeddings": ("/v1/embeddings", {"model": TINY_NAME, "input": "hi"}),
    "messages": ("/v1/messages", {"model": TINY_NAME, "messages": USER, "max_tokens": 2}),
}
NOT_JSON = "not valid JSON"  # the gateway's message for NaN / Infinity in a body


def _bias(n: int) -> dict[str, float]:
    return {str(i): 1.0 for i in range(n)}


# (api, fields laid over its base body, expected status, the 400's param or a piece of its
# message; None: not checked). Found by a wider sweep (~320 cases) of which these are the
# extremes of each kind.
CASES: list[tuple[str, dict[str, Any], int, str | None]] = [
    # Tiny, negative zero and huge floats; ints past int64 where a float is wanted.
    ("completions", {"temperature": 1e-38}, 200, None),
    ("completions", {"temperature": -0.0}, 200, None),
    ("completions", {"temperature": 1e300}, 400, "temperature"),
    ("completions", {"temperature": 2**64}, 400, "temperature"),
    ("completions", {"top_p": 1e-38}, 200, None),
    ("completions", {"top_p": -0.0}, 400, "top_p must be in (0, 1]"),
    ("completions", {"min_p": 1e-38}, 200, None),
    ("completions", {"repetition_penalty": 1e-38}, 400, "repetition_penalty"),
    ("completions", {"frequency_penalty": -0.0}, 200, None),
    ("completions", {"presence_penalty": 1e300}, 400, "presence_penalty"),
    # Non-finite numbers: not JSON, refused before any field is read.
    ("completions", {"temperature": NAN}, 400, NOT_JSON),
    ("completions", {"top_p": INF}, 400, NOT_JSON),
    ("completions", {"max_tokens": -INF}, 400, NOT_JSON),
    ("completions", {"logit_bias": {"1": NAN}}, 400, NOT_JSON),
    ("chat", {"frequency_penalty": NAN}, 400, NOT_JSON),
    ("responses", {"temperature": INF}, 400, NOT_JSON),
    ("embeddings", {"dimensions": NAN}, 400, NOT_JSON),
    ("messages", {"top_k": NAN}, 400, NOT_JSON),
    # Integers at and past the wire's int32 / int64.
    ("completions", {"max_tokens": 2**63}, 400, "max_tokens"),
    ("completions", {"max_tokens": 2**64}, 400, "max_tokens"),
    ("completions", {"max_tokens": -(2**63)}, 400, "max_tokens"),
    ("completions", {"max_tokens": 10**9}, 400, "maximum context length"),
    ("completions", {"max_tokens": 1e300}, 400, "max_tokens"),
    ("completions", {"min_tokens": 2**63}, 400, "min_tokens"),
    ("completions", {"top_k": 10**9}, 200, None),
    ("completions", {"top_k": 2**64}, 400, "top_k"),
    ("completions", {"seed": 2**64}, 400, "seed"),
    ("completions", {"seed": -(2**63)}, 200, None),
    ("completions", {"n": 10**9}, 400, "n"),
    ("completions", {"n": 10**9, "best_of": 10**9}, 400, "n"),
    ("completions", {"logprobs": 10**9}, 400, "logprobs"),
    ("completions", {"logprobs": 2**64}, 400, "logprobs"),
    ("completions", {"n": -(2**63)}, 400, "n"),
    ("chat", {"top_k": 2**64}, 400, "top_k"),
    ("responses", {"seed": 2**64}, 400, "seed"),
    ("embeddings", {"dimensions": -(2**63)}, 400, "dimensions"),
    ("chat", {"max_completion_tokens": 2**63}, 400, "max_completion_tokens"),
    ("chat", {"max_tokens": 2**64}, 400, "max_tokens"),
    ("chat", {"n": 10**9}, 400, "n"),
    ("chat", {"logprobs": True, "top_logprobs": 2**64}, 400, "top_logprobs"),
    ("chat", {"seed": 2**64}, 400, "seed"),
    ("responses", {"max_output_tokens": 2**63}, 400, "max_output_tokens"),
    ("responses", {"max_output_tokens": -(2**63)}, 400, "max_output_tokens"),
    ("responses", {"top_logprobs": 10**9}, 400, "top_logprobs"),
    ("messages", {"max_tokens": 2**63}, 400, "'max_tokens' must be"),
    ("messages", {"max_tokens": 2**64}, 400, "'max_tokens' must be"),
    ("messages", {"top_k": -(2**63)}, 400, "top_k"),
    ("messages", {"top_k": 2**63}, 400, "top_k"),
    ("messages", {"temperature": 1e300}, 400, "temperature"),
    ("embeddings", {"dimensions": 2**63}, 400, "dimensions"),
    # Wrong JSON types where numbers go.
    ("completions", {"temperature": ""}, 400, "temperature"),
    ("completions", {"top_k": []}, 400, "top_k"),
    ("completions", {"max_tokens": {}}, 400, "max_tokens"),
    # Empty and nested prompts and inputs.
    ("completions", {"prompt": [[]]}, 400, "prompt"),
    ("completions", {"prompt": [[], [1]]}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": [""]}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": [2**63]}, 400, "prompt"),
    ("completions", {"prompt": "a\ud800"}, 400, "lone UTF-16 surrogate"),  # was a 500
    ("messages", {"messages": [{"role": "user", "content": "\udfff"}]}, 400, "lone UTF-16"),
    ("completions", {"prompt": [[1] * 100_000]}, 400, "maximum context length"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": [[]]}, 400, "messages"),
    ("chat", {"messages": [{"role": "user", "content": []}]}, 400, "messages[0].content"),
    (
        "chat",
        {"messages": [*USER, {"role": "assistant", "content": "a", "tool_calls": []}, *USER]},
        400,
        "messages[1].tool_calls",
    ),
    ("responses", {"input": [[]]}, 400, "input"),
    ("embeddings", {"input": [[]]}, 400, "input"),
    ("embeddings", {"input": ["x"] * 100_000}, 400, "input"),
    ("messages", {"messages": []}, 400, "at least one message"),
    # Huge lists and strings.
    ("completions", {"logit_bias": _bias(100_000)}, 400, "not in the vocabulary"),
    ("chat", {"logit_bias": _bias(100_000)}, 400, "not in the vocabulary"),
    ("completions", {"stop": [f"s{i}" for i in range(10_000)]}, 400, "stop"),
    ("completions", {"stop_token_ids": list(range(100_000))}, 400, "at most 256 stop"),
    ("messages", {"stop_sequences": [f"s{i}" for i in range(10_000)]}, 400, "at most 256 are"),
    ("completions", {"stop": "x" * 1_000_000}, 400, "stop"),
    ("chat", {"stop": ["x" * 1_000_000]}, 400, "stop"),
    ("messages", {"stop_sequences": ["x" * 1_000_000]}, 400, "stop"),
    # Session 20's sweep: whitespace-only stops and a 1 MB user id are fine; 10^3 tools are a
    # prompt past the context; the rest were answered silently without what they asked for.
    ("completions", {"stop": " "}, 200, None),
    ("chat", {"stop": [" ", "\n", "\t"]}, 200, None),
    ("completions", {"user": "u" * 1_000_000}, 200, None),
    (
        "chat",
        {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(1000)]},
        400,
        "maximum context length",
    ),
    ("completions", {"min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    ("chat", {"min_tokens": 2**31 - 1}, 400, "min_tokens"),
    ("completions", {"prompt_logprobs": 1}, 400, "prompt_logprobs"),
    ("chat", {"chat_template": "{{ raise_exception('x') }}"}, 400, "chat_template"),
    ("chat", {"continue_final_message": True}, 400, "continue_final_message"),
    ("chat", {"add_generation_prompt": False}, 200, None),
    ("chat", {"chat_template_kwargs": "x"}, 400, "chat_template_kwargs"),
    (
        "chat",
        {"chat_template_kwargs": {"add_generation_prompt": False}},
        400,
        "chat_template_kwargs",
    ),
    ("chat", {"chat_template_kwargs": {"enable_thinking": False, "x": [1] * 10_000}}, 200, None),
    ("responses", {"input": [{"role": "user", "content": []}]}, 400, "input[0].content"),
    (
        "messages",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
        400,
        "text content blocks must be non-empty",
    ),
]


def _sdk_writes(body: dict[str, Any]) -> bool:
    """Whether the SDKs can send ``body``: they refuse NaN / Infinity, and text that UTF-8
    cannot encode (a lone surrogate, which JSON can carry as an escape)."""
    try:
        json.dumps(body, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, UnicodeEncodeError):
        return False
    return True


@pytest.fixture(scope="module")
def cluster(llama_cluster):
    return llama_cluster  # shared with other modules (tests/conftest.py)


def _send(cluster, oai, claude, api: str, fields: dict[str, Any]) -> tuple[int, Any]:
    """(status, parsed body) of one request: through the API's SDK, or as raw HTTP where the
    body holds a number the SDKs refuse to write."""
    path, base = BASE[api]
    body = {**base, **fields}
    if not _sdk_writes(body):
        r = httpx.post(cluster.base_url + path, content=json.dumps(body, allow_nan=True),
                       headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
        return r.status_code, r.json()
    client = claude if api == "messages" else oai
    sdk = anthropic if api == "messages" else openai
    try:
        # NOTE: cast_to=object: the SDK's own request and errors, the JSON body unparsed.
        got = client.post(path if api == "messages" else path[3:], body=body, cast_to=object)
    except sdk.APIStatusError as err:
        return err.status_code, err.response.json()
    return 200, got


def _shaped(api: str, body: dict[str, Any], expect: str | None) -> bool:
    """An error in its API's format whose param is ``expect`` (OpenAI's format, for a name), or
    whose message holds it (a phrase; or a name, in Anthropic's format, which has no param)."""
    if api == "messages":
        err = body.get("error") or {}
        ok = body.get("type") == "error" and bool(err.get("type") and err.get("message"))
        return ok and (expect is None or expect in err["message"])
    err = body.get("error") or {}
    if not (err.get("message") and err.get("type")):
        return False
    if expect is None:
        return True
    return err.get("param") == expect if expect.isidentifier() else expect in err["message"]


def _greedy(oai) -> str:
    got = oai.completions.create(model=TINY_NAME, prompt="The capital of France is", max_tokens=6,
                                 temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    return got.choices[0].text


def test_extremes_get_their_status_and_the_cluster_stays_whole(cluster) -> None:
    oai, claude = openai_client(cluster, timeout=60), anthropic_client(cluster, timeout=60)
    pids = [p.proc.pid for p in [*cluster.workers, *cluster.routers]]
    reference = _greedy(oai)
    failures = []
    for api, fields, status, expect in CASES:
        case = f"{api} {json.dumps(fields, allow_nan=True)[:80]}"
        got, body = _send(cluster, oai, claude, api, fields)
        if got != status:
            failures.append(f"{case}: {got} (expected {status}): {str(body)[:200]}")
        elif got != 200 and not _shaped(api, body, expect):
            failures.append(f"{case}: expected {expect!r} in the error: {str(body)[:300]}")
        alive = [p.alive() for p in [*cluster.workers, *cluster.routers]]
        now = [p.proc.pid for p in [*cluster.workers, *cluster.routers]]
        assert all(alive) and now == pids, f"after {case}: a process died ({alive}, {now})"
        assert _greedy(oai) == reference, f"after {case}: greedy tokens changed"
    assert not failures, "\n".join(failures)
