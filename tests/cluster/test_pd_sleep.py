"""Sleep and wake-up of a model served by a prefill + decode pair (real worker processes,
etcd, router and the Mooncake transfer engine): `epdserve models sleep` puts both workers to
sleep; requests wait, then get a 503 with Retry-After, also while only one side is awake;
waking both brings the pair back, and PD answers as the offline engine again (the decode
worker's KV cache and the prefill worker's, given back while asleep, take pushes again)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from cluster_helpers import (
    TINY_ENGINE,
    TINY_NAME,
    cli,
    load_report,
    start_cluster,
    wait_for,
    workers,
)

from services.engine import LLM, SamplingParams
from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

PROMPTS = ["The capital of France is", "Write a haiku about autumn leaves " * 4, "1 2 3 4 5"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def pd(tiny_model_dir):
    c = start_cluster(tiny_model_dir("llama"), workers=0, prefill=1, decode=1)
    yield c
    c.stop()


def post(c, prompt: str) -> httpx.Response:
    body = {"model": TINY_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    return httpx.post(c.base_url + "/v1/completions", json=body, timeout=120)


def text(c, prompt: str) -> str:
    r = post(c, prompt)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def answers_concurrently(c) -> list[str]:
    out: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, text(c, PROMPTS[i])))
               for i in range(len(PROMPTS))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [out.get(i, "") for i in range(len(PROMPTS))]


def assert_waits_then_503(c) -> None:
    from services.router.gateway import ASLEEP_RETRY_AFTER_S, ASLEEP_WAIT_S

    started = time.monotonic()
    r = post(c, PROMPTS[0])
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_asleep", r.text
    assert r.headers["retry-after"] == str(ASLEEP_RETRY_AFTER_S)
    assert time.monotonic() - started >= ASLEEP_WAIT_S - 1.0  # it waited for a wake-up


def test_a_pd_pair_sleeps_and_wakes(pd, tiny_model_dir) -> None:
    offline = LLM(str(tiny_model_dir("llama")), **TINY_ENGINE)
    want = [offline.generate(offline.tokenizer.encode(p), GREEDY)[0].outputs[0].text
            for p in PROMPTS]  # fmt: skip
    rows = workers(pd)
    by_role = {row["role"]: w for w, row in rows.items()}
    assert set(by_role) == {"prefill", "decode"}, rows  # no mixed worker: answers went PD
    prefill, decode = by_role["prefill"], by_role["decode"]
    assert answers_concurrently(pd) == want

    for w in (decode, prefill):
        r = cli(pd, "models", "sleep", w)
        assert r.returncode == 0 and "asleep" in r.stdout, r.stderr
    # NOTE: `models sleep` answers when the worker has slept; the router's view follows from
    # the worker's etcd entry a moment later, so wait for it rather than read it once.
    both_asleep = {prefill: "sleeping", decode: "sleeping"}
    wait_for(lambda: {w: row["state"] for w, row in workers(pd).items()} == both_asleep,
             timeout=30, what="the router to see both workers asleep")  # fmt: skip
    assert_waits_then_503(pd)

    # The prefill side awake, the decode side asleep: still no pair, the model still sleeps
    # (this was a no_workers 503 at once: not every worker of it slept).
    r = cli(pd, "models", "wake", prefill)
    assert r.returncode == 0 and "awake" in r.stdout, r.stderr
    assert_waits_then_503(pd)

    # A request that arrives with the decode side asleep and sees it wake is served.
    late: list[str] = []
    waiting = threading.Thread(target=lambda: late.append(text(pd, PROMPTS[0])))
    waiting.start()
    time.sleep(0.5)
    r = cli(pd, "models", "wake", decode)
    assert r.returncode == 0 and "awake" in r.stdout, r.stderr
    waiting.join(120)
    assert late == [want[0]]
    # PD works again, every answer as the offline engine's, and the decode worker's blocks
    # all come back.
    assert answers_concurrently(pd) == want
    address = workers(pd)[decode]["address"]
    deadline = time.monotonic() + 30
    while (rep := load_report(address)).num_free_blocks != rep.num_total_blocks:
        assert time.monotonic() < deadline, (rep.num_free_blocks, rep.num_total_blocks)
        time.sleep(0.5)
