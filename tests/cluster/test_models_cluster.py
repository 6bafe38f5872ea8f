"""Several base models on one cluster: two tiny random models of different families and
vocabularies (the default tokenizer's 49,152 tokens; a 350-token BPE with another chat
template), one mixed worker each, one router. Through the OpenAI SDK each model answers as its
offline engine does (the router tokenizes with that model's tokenizer and template, and routes
to its workers); /v1/models lists both; an unknown model is a 404. One model sleeps under the
other's traffic (its requests wait, then get a 503 with Retry-After) and wakes up. A worker
loads the other model and back (a bad path or architecture is a 400, weights that fail to load
bring its old model back with a 422) while the model it leaves keeps its other worker's
answers."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from cluster_helpers import (
    TINY_ENGINE,
    TINY_NAME,
    cli,
    get_json,
    keep_calling,
    openai_client,
    start_cluster,
    wait_for,
    workers,
)
from model_groups import build_other_model

from services.cli.cluster_spec import ModelGroup
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


def complete(oai, model: str) -> str:
    got = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                 extra_body={"ignore_eos": True})  # fmt: skip
    return got.choices[0].text


def test_one_model_sleeps_and_wakes_under_the_others_traffic(cluster, offline) -> None:
    from services.router.gateway import ASLEEP_RETRY_AFTER_S

    want = {name: llm.generate(llm.tokenizer.encode(PROMPT), GREEDY)[0].outputs[0].text
            for name, llm in offline.items()}  # fmt: skip
    (sleeper,) = [w for w, row in workers(cluster).items() if row["model"] == OTHER_NAME]
    oai = openai_client(cluster)
    stop, answers = threading.Event(), []  # the other model's requests, all along
    loop = threading.Thread(target=keep_calling, args=(lambda: complete(oai, TINY_NAME), stop,
                                                       answers, 500))  # fmt: skip
    loop.start()
    try:
        r = cli(cluster, "models", "sleep", sleeper)
        assert r.returncode == 0 and "asleep" in r.stdout, r.stderr
        # NOTE: the sleep answers when the worker has slept; the router's view follows from
        # the worker's etcd entry a moment later (as in test_pd_sleep): wait, not read once.
        wait_for(lambda: workers(cluster)[sleeper]["state"] == "sleeping", timeout=30,
                 what="the router to see the worker asleep")  # fmt: skip
        # Nothing wakes it: the request waits, then gets a 503 with Retry-After.
        started = time.monotonic()
        body = {"model": OTHER_NAME, "prompt": PROMPT, "max_tokens": 2}
        resp = httpx.post(cluster.base_url + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_asleep"
        assert resp.headers["retry-after"] == str(ASLEEP_RETRY_AFTER_S)
        assert time.monotonic() - started >= 4.0  # it waited for a worker to wake up
        # A request that arrives asleep and sees a worker wake up within the bound is served.
        waiting = []
        late = threading.Thread(target=lambda: waiting.append(complete(oai, OTHER_NAME)))
        late.start()
        time.sleep(0.5)
        woke = httpx.post(cluster.base_url + f"/admin/workers/{sleeper}/sleep",
                          json={"sleep": False}, timeout=120,
                          headers={"Authorization": f"Bearer {cluster.admin_token}"})  # fmt: skip
        assert woke.status_code == 200 and woke.json()["sleeping"] is False, woke.text
        late.join(60)
        assert waiting == [want[OTHER_NAME]]
        assert complete(oai, OTHER_NAME) == want[OTHER_NAME]
        assert workers(cluster)[sleeper]["state"] == "serving"
    finally:
        stop.set()
        loop.join(120)
    assert answers and set(answers) == {want[TINY_NAME]}, answers[:3]


# A model load answers within seconds here (20-30 s at a load of 20); the router waits up to
# its LOAD_WAIT_S (600 s) for the worker: a call still unanswered after this fails the test
# with what the router knows of the workers and the processes' last lines (the router's say
# what the load waits on), well before the module's 400 s timeout kills it.
LOAD_CALL_S = 150.0


def admin_post(cluster, path: str, body: dict, timeout: float = LOAD_CALL_S) -> httpx.Response:
    try:
        return httpx.post(cluster.base_url + path, json=body, timeout=timeout,
                          headers={"Authorization": f"Bearer {cluster.admin_token}"})  # fmt: skip
    except httpx.TimeoutException:
        rows = {w: (r["state"], r["model"], r["for_s"], r["load_error"])
                for w, r in workers(cluster).items()}  # fmt: skip
        said = "\n".join(f"--- {p.name}:\n{p.last_output(30)}"
                         for p in (*cluster.routers, *cluster.workers))  # fmt: skip
        pytest.fail(f"POST {path} {body}: no answer in {timeout:.0f} s; the router's workers "
                    f"(state, model, for_s, load_error): {rows}\n{said}")  # fmt: skip


def test_a_worker_loads_the_other_model_and_back(cluster, offline, tiny_model_dir, other_model,
                                                 tmp_path) -> None:  # fmt: skip
    import transformers

    want = {name: llm.generate(llm.tokenizer.encode(PROMPT), GREEDY)[0].outputs[0].text
            for name, llm in offline.items()}  # fmt: skip
    (mover,) = [w for w, row in workers(cluster).items() if row["model"] == OTHER_NAME]
    (stayer,) = [w for w, row in workers(cluster).items() if row["model"] == TINY_NAME]
    oai = openai_client(cluster)
    # Refused before anything changes: a missing path, an architecture the engine lacks.
    transformers.GPT2Config(n_layer=1).save_pretrained(str(tmp_path / "gpt2"))
    for bad, says in ((tmp_path / "nope", "neither a folder"),
                      (tmp_path / "gpt2", "unsupported model architecture")):  # fmt: skip
        r = admin_post(cluster, f"/admin/workers/{mover}/model", {"model": str(bad)})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    # Weights that fail to load: the worker restarts, falls back to its model and says why.
    broken = tmp_path / "broken"
    shutil.copytree(other_model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    r = admin_post(cluster, f"/admin/workers/{mover}/model", {"model": str(broken)})
    assert r.status_code == 422 and f"serves {OTHER_NAME} again" in r.text, r.text
    assert workers(cluster)[mover]["state"] == "serving"
    # `epdserve status` says why (the header of a safetensors file that is not one).
    said = cli(cluster, "status").stdout
    assert f"{mover} serves {OTHER_NAME} again: SafetensorError" in said, said
    assert complete(oai, OTHER_NAME) == want[OTHER_NAME]

    # Onto the first model: two workers serve it, the other model is gone.
    r = cli(cluster, "models", "load", mover, "--model", str(tiny_model_dir("llama")),
            "--served-model-name", TINY_NAME)  # fmt: skip
    assert r.returncode == 0 and f"serves {TINY_NAME} (was {OTHER_NAME}" in r.stdout, r.stderr
    assert {w: row["model"] for w, row in workers(cluster).items()} == {
        mover: TINY_NAME, stayer: TINY_NAME}  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        complete(oai, OTHER_NAME)
    # The moved worker answers as the first model's offline engine (the other one drained).
    assert cli(cluster, "drain", stayer).returncode == 0
    try:
        assert complete(oai, TINY_NAME) == want[TINY_NAME]
    finally:
        assert cli(cluster, "drain", stayer, "--undo").returncode == 0
    wait_for(lambda: workers(cluster)[stayer]["state"] == "serving", what="undrained")

    # And back, under the first model's traffic, which its other worker serves throughout.
    stop, answers = threading.Event(), []
    loop = threading.Thread(target=keep_calling, args=(lambda: complete(oai, TINY_NAME), stop,
                                                       answers, 500))  # fmt: skip
    loop.start()
    try:
        r = admin_post(cluster, f"/admin/workers/{mover}/model",
                       {"model": str(other_model), "served_model_name": OTHER_NAME})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["model"] == OTHER_NAME and r.json()["previous_model"] == TINY_NAME
    finally:
        stop.set()
        loop.join(120)
    assert answers and set(answers) == {want[TINY_NAME]}, answers[:3]
    assert complete(oai, OTHER_NAME) == want[OTHER_NAME]
    chat_want = offline[OTHER_NAME].chat(CHAT, GREEDY)[0].outputs[0].text
    chat = oai.chat.completions.create(model=OTHER_NAME, messages=CHAT, max_tokens=8,  # type: ignore[arg-type]
                                       temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert chat.choices[0].message.content == chat_want


def test_a_worker_that_dies_restarting_with_a_model_ends_the_load_at_once(
    cluster, tiny_model_dir
) -> None:
    """Killed once it restarted with the new command line (os.execv: same pid) while it loads:
    the admin call answers 503 worker_lost within seconds, where it waited its whole 600 s for
    a 504 (the restarting process had left etcd, so nothing told the router it died)."""
    (row,) = [row for row in workers(cluster).values() if row["model"] == OTHER_NAME]
    target = str(tiny_model_dir("llama").resolve())
    answers: list = []
    path = f"/admin/workers/{row['id']}/model"
    call = threading.Thread(target=keep_calling, args=(
        lambda: admin_post(cluster, path, {"model": target}, timeout=120), threading.Event(),
        answers, 1))  # fmt: skip
    call.start()
    wait_for(lambda: target in Path(f"/proc/{row['pid']}/cmdline").read_text(), every=0.05,
             what="the restart with the new model")  # fmt: skip
    assert workers(cluster)[row["id"]]["state"] == "loading"  # its key stays while it restarts
    os.kill(row["pid"], signal.SIGKILL)
    call.join(120)
    (r,) = answers
    assert isinstance(r, httpx.Response), r  # not a timeout
    assert r.status_code == 503 and r.json()["error"]["code"] == "worker_lost", r.text
    # Started again (as a supervisor would): its own command line, its own model.
    (proc,) = [p for p in cluster.workers if p.ready_field("id") == row["id"]]
    proc.restart()
    wait_for(lambda: workers(cluster).get(row["id"], {}).get("state") == "serving",
             timeout=120, what="the worker serving again")  # fmt: skip
    assert workers(cluster)[row["id"]]["model"] == OTHER_NAME
