"""Queries of death through the real gateway: every sampling-parameter extreme the APIs accept
(and a few they refuse) on a PD pair and a mixed worker, then the same worker processes are
alive with the same pids and a normal request gives the reference tokens.

Before the hardening, one request with ``temperature: 1e-38`` overflowed the sampler's softmax
to NaN, ``torch.multinomial`` raised in the engine step thread, the worker exited and the
router sent the same request on to the next worker, which died too."""

from __future__ import annotations

import json
import math
import signal
import threading
import time

import httpx
import pytest
from cluster_helpers import (
    TINY_NAME,
    generated,
    signal_mid_request,
    start_cluster,
    worker_health,
)

from services.cli.cluster_spec import ModelGroup
from tests.deps import MOONCAKE, require

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
require("mooncake.engine", MOONCAKE)

# Accepted by the API: each must be answered (200) and kill nothing.
EXTREMES: list[dict] = [
    {"temperature": 1e-38},
    {"temperature": 5e-324},
    {"temperature": 1e-6, "top_p": 1e-9},
    {"temperature": 2.0, "top_k": 2**31 - 1, "min_p": 1.0},
    {"temperature": 2.0, "top_p": 1e-38, "top_k": 1},
    {"temperature": 0.5, "repetition_penalty": 0.01, "presence_penalty": -2,
     "frequency_penalty": -2},
    {"temperature": 1.0, "repetition_penalty": 10.0, "presence_penalty": 2,
     "frequency_penalty": 2},
    {"temperature": 1.0, "logit_bias": {"0": 100, "1": -100, "2": 100, "49151": 100}},
    {"temperature": 1.0, "seed": -(2**63)},
    {"temperature": 1.0, "seed": 2**63 - 1, "n": 3},
    {"temperature": 1.0, "logprobs": 20, "min_tokens": 4},
    {"temperature": 0.0, "logit_bias": {str(i): -100 for i in range(300)}},
    {"temperature": 1.0, "stop": ["a", "b", "c", "d"], "stop_token_ids": [0, 1, 2]},
]  # fmt: skip
# Outside the documented bounds: a 400 in the API's format, before any work.
REFUSED: list[dict] = [
    {"temperature": 2.5},
    {"temperature": -1e-38},
    {"repetition_penalty": 0.0},
    {"repetition_penalty": 1e-38},
    {"top_k": 2**31},
    {"top_p": 0},
    {"min_tokens": 2**40},
    {"stop_token_ids": [2**31]},
    {"logit_bias": {"0": 101}},
    {"n": 10_000},
]
PROMPT = "The capital of France is"


# One cluster serves both paths: the same tiny model as two served models, one on a PD pair
# and one on two mixed workers. The router keeps a pool per model, so a request names its path.
MIXED_NAME = TINY_NAME + "-mixed"
MODEL_OF = {"pd": TINY_NAME, "mixed": MIXED_NAME}


def pids(c) -> dict[str, int]:
    return {p.name: p.proc.pid for p in c.workers}


def completions_battery(client: httpx.Client, model: str, prompt: str | list[int]) -> None:
    """Each of EXTREMES answered (200, every choice finished), each of REFUSED (and a NaN or
    1e300 temperature) refused with a 400 in OpenAI's format."""
    for extra in EXTREMES:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, **extra}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, (extra, r.text)
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] in ("stop", "length"), (extra, choice)
    for extra in [*REFUSED, {"temperature": 1e300}]:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, **extra}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error", r.text
    # NaN is no JSON, but Python's json (and others) write it: the router must refuse it.
    raw = json.dumps({"model": model, "prompt": "hi", "max_tokens": 4, "temperature": math.nan})
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    model = tiny_model_dir("llama")
    c = start_cluster(model, workers=0, prefill=1, decode=1,
                      more_models=[ModelGroup(str(model), MIXED_NAME, mixed=2)])  # fmt: skip
    yield c
    c.stop()


@pytest.mark.parametrize("path", ["pd", "mixed"])
def test_extreme_parameters_kill_no_worker(cluster, path: str) -> None:
    model = MODEL_OF[path]
    before = pids(cluster)
    with httpx.Client(base_url=cluster.base_url, timeout=120) as client:
        reference = client.post("/v1/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True,
        })  # fmt: skip
        assert reference.status_code == 200, reference.text
        completions_battery(client, model, PROMPT)
        for extra in EXTREMES:
            chat = dict(extra)
            if "logprobs" in chat:  # chat: a boolean plus top_logprobs
                chat.update(logprobs=True, top_logprobs=chat["logprobs"])
            r = client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 4, "stream": True, **chat,
            })  # fmt: skip
            assert r.status_code == 200 and "data: [DONE]" in r.text, (extra, r.text)
        r = client.post("/v1/messages", json={
            "model": model, "max_tokens": 4, "temperature": 1e-38, "top_k": 2**31 - 1,
            "messages": [{"role": "user", "content": PROMPT}],
        })  # fmt: skip
        assert r.status_code == 200, r.text
        again = client.post("/v1/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True,
        })  # fmt: skip
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["text"] == reference.json()["choices"][0]["text"]
    assert all(p.alive() for p in cluster.workers)
    assert pids(cluster) == before


def _stream(base_url: str, body: dict, out: list[dict]) -> None:
    """Stream ``body``; ``out`` gets each event (an error body too) and, last, the status."""
    with httpx.Client(base_url=base_url, timeout=180) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    out.append(json.loads(line[6:]))
                elif line.startswith("{"):
                    out.append(json.loads(line))
            out.append({"status": r.status_code})


def test_workers_stopped_together_make_no_poison_request(cluster) -> None:
    """A freeze is no query of death: the two mixed workers stopped one second apart (a
    node's SIGSTOP, a host that stalls, a store that froze them: session 20) while greedy
    streams run on them. Each stream moved off the first one goes to the second (still
    listed: its silence is under load_stale_s), which was already silent when it got there,
    so that is no death of the request's: every stream finishes once the workers resume,
    and the same request is served again. Before: those streams counted two deaths and
    failed as poison_request, and their identical retries were refused for 10 minutes."""
    health = worker_health(cluster.base_url, cluster.admin_token)[1]["workers"]
    mixed = [w for w in cluster.workers if health[w.name]["role"] == "mixed"]
    assert len(mixed) == 2, health
    body = {"model": MIXED_NAME, "prompt": PROMPT, "max_tokens": 480, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    made = {w.name: generated(w) for w in mixed}
    outs: list[list[dict]] = [[] for _ in range(4)]
    threads = [threading.Thread(target=_stream, args=(cluster.base_url, body, out), daemon=True)
               for out in outs]  # fmt: skip
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # the first worker to run streams is stopped first
            rows = worker_health(cluster.base_url, cluster.admin_token)[1]["workers"]
            busy = [w for w in mixed if rows[w.name]["inflight"] > 0]
            if busy:
                break
            assert time.monotonic() < deadline, "no stream reached a mixed worker in 60 s"
            time.sleep(0.02)
        first = busy[0]
        second = next(w for w in mixed if w is not first)
        assert signal_mid_request(first, signal.SIGSTOP, made[first.name], 4 * 480), (
            "the streams finished before the fault"
        )
        # NOTE: a fault's timing, not a wait for a condition: the second worker freezes
        # while the first one's silence is still far under load_stale_s (5 s).
        time.sleep(1.0)
        second.signal(signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while True:  # both out of routing (or dropped, their leases expired)
            rows = worker_health(cluster.base_url, cluster.admin_token)[1]["workers"]
            if not any(rows.get(w.name, {}).get("reachable") for w in mixed):
                break
            assert time.monotonic() < deadline, f"stopped workers still reachable: {rows}"
            time.sleep(0.05)
    finally:
        for w in mixed:
            w.signal(signal.SIGCONT)
    for t in threads:
        t.join(timeout=180)
        assert not t.is_alive(), "a stream did not end within 180 s"
    texts = set()
    for out in outs:
        assert out[-1] == {"status": 200}, out[-3:]
        errors = [e for e in out if "error" in e]
        assert not errors, errors
        assert out[-2]["usage"]["completion_tokens"] == 480, out[-2]
        texts.add("".join(c["text"] for e in out[:-1] for c in e["choices"]))
    assert len(texts) == 1, texts  # greedy: the moved streams' text is the others'
    r = httpx.post(cluster.base_url + "/v1/completions", json={**body, "stream": False},
                   timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    assert all(p.alive() for p in cluster.workers)
