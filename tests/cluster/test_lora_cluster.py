"""LoRA adapters through a real PD cluster (etcd, a prefill and a decode worker, router) and
the OpenAI SDK: an adapter named as the model answers as the offline engine does with it (the
adapter travels in Reserve and Prefill), /v1/models lists it with its parent, and adapters
loaded and unloaded through vLLM's admin endpoints under a stream of base-model requests."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from cluster_helpers import (
    TINY_ENGINE,
    TINY_NAME,
    get_json,
    keep_calling,
    load_report,
    openai_client,
    start_cluster,
    wait_for,
    worker_health,
)

from services.engine import LLM, SamplingParams
from tests.engine.lora_helpers import LORA_ENGINE, sql_and_chat

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    return sql_and_chat(tiny_model_dir("llama"), tmp_path_factory, seeds=(11, 12))


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, adapters):
    engine = {**LORA_ENGINE, "lora_modules": [f"sql={adapters['sql']}"]}
    c = start_cluster(tiny_model_dir("llama"), workers=0, prefill=1, decode=1,
                      engine_overrides=engine)  # fmt: skip
    yield c
    c.stop()


@pytest.fixture(scope="module")
def offline(tiny_model_dir, adapters):
    modules = [f"{name}={path}" for name, path in adapters.items()]
    return LLM(str(tiny_model_dir("llama")), served_model_name=TINY_NAME,
               **{**TINY_ENGINE, **LORA_ENGINE, "lora_modules": modules})  # fmt: skip


def expected(offline: LLM, lora: str | None) -> str:
    ids = offline.tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    return offline.generate(ids, params, lora=lora)[0].outputs[0].text


def complete(oai, model: str) -> str:
    got = oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0,
                                 extra_body={"ignore_eos": True})  # fmt: skip
    assert got.model == model
    return got.choices[0].text


def admin(cluster, path: str, body: dict, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or cluster.admin_token}"}
    return httpx.post(cluster.base_url + path, json=body, headers=headers, timeout=60)


def test_adapter_answers_as_offline_engine(cluster, offline) -> None:
    _, models = get_json(cluster.base_url + "/v1/models")
    cards = {m["id"]: m for m in models["data"]}
    assert cards["sql"]["parent"] == TINY_NAME and cards[TINY_NAME].get("parent") is None
    oai = openai_client(cluster)
    base, sql = complete(oai, TINY_NAME), complete(oai, "sql")
    assert sql == expected(offline, "sql") and base == expected(offline, None)
    assert sql != base
    with pytest.raises(openai.NotFoundError):
        complete(oai, "chat")  # not loaded yet


def test_load_and_unload_under_traffic(cluster, offline) -> None:
    oai = openai_client(cluster)
    want = expected(offline, None)
    stop = threading.Event()
    results: list[str | BaseException] = []

    def traffic() -> None:
        keep_calling(lambda: complete(oai, TINY_NAME), stop, results)

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        path = str(offline.engine.loras.adapters["chat"].path)
        assert admin(cluster, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": path},
                     token="wrong").status_code == 401  # fmt: skip
        bad = admin(cluster, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nope"})
        assert bad.status_code == 400 and "adapter_config.json" in bad.text
        r = admin(cluster, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": path})
        assert r.status_code == 200, r.text
        assert sorted(r.json()["workers"]) == ["worker-0", "worker-1"]
        assert complete(oai, "chat") == expected(offline, "chat")
        r = admin(cluster, "/v1/unload_lora_adapter", {"lora_name": "chat"})
        assert r.status_code == 200, r.text
        with pytest.raises(openai.NotFoundError):
            complete(oai, "chat")
        assert admin(cluster, "/v1/unload_lora_adapter", {"lora_name": "chat"}).status_code == 404
        assert complete(oai, "sql") == expected(offline, "sql")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert results and all(r == want for r in results), [r for r in results if r != want][:3]


def test_a_worker_started_later_loads_the_recorded_adapters(cluster, offline) -> None:
    path = str(offline.engine.loras.adapters["chat"].path)
    r = admin(cluster, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": path})
    assert r.status_code == 200, r.text
    late = cluster.start_worker("mixed")  # its command line names "sql" only
    wait_for(lambda: late.ready.is_set() or not late.alive(), timeout=120, what="worker ready")
    assert late.ready.is_set(), late.describe_failure()
    address = late.ready_field("address")
    wait_for(lambda: set(load_report(address).lora_adapters) == {"chat", "sql"},
             timeout=30, what="the late worker holds the recorded adapter")  # fmt: skip
    url = cluster.base_url
    wait_for(lambda: late.name in worker_health(url, cluster.admin_token)[1]["workers"],
             timeout=30, what="the router knows the late worker")  # fmt: skip
    r = admin(cluster, "/v1/unload_lora_adapter", {"lora_name": "chat"})
    assert r.status_code == 200 and late.name in r.json()["workers"], r.text
    assert set(load_report(address).lora_adapters) == {"sql"}
