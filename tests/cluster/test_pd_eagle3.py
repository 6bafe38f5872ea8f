"""EAGLE-3 under PD with real processes: a prefill and a decode worker (Mooncake KV push, the
head's inputs pushed with it into a region of the reservation, the router carrying their
tokens only) draft and accept exactly as a co-located worker with the same head, and give its
tokens."""

from __future__ import annotations

import json

import httpx
import pytest
from cluster_helpers import TINY_NAME, start_cluster
from test_query_of_death import completions_battery

from tests.deps import MOONCAKE, require
from tests.engine.test_speculative import copy_bias, repetitive_prompts
from tests.engine.test_speculative_draft import biased_eagle3_head

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


def eagle3_spec(model, tmp_path_factory) -> str:
    """--speculative-config of a random EAGLE-3 head for ``model`` (3 drafts, fixed length),
    whose draft vocabulary holds the tokens copy_bias() favours."""
    head = biased_eagle3_head(str(model), tmp_path_factory.mktemp("eagle3"))
    return json.dumps({"method": "eagle3", "model": head, "num_speculative_tokens": 3,
                       "disable_by_batch_size": 0, "adaptive": False})  # fmt: skip


@pytest.fixture(scope="module")
def clusters(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir("llama")
    spec = eagle3_spec(model, tmp_path_factory)
    # NOTE: no prefix caching: each request runs from its first token on both clusters (a
    # prefill-side hit: test_eagle3_handoff's test_prefill_side_prefix_hit_...).
    engine = {"speculative_config": spec, "enable_prefix_caching": False}
    pd = start_cluster(model, workers=0, prefill=1, decode=1, engine_overrides=engine)
    try:
        colocated = start_cluster(model, workers=1, engine_overrides=engine)
    except BaseException:
        pd.stop()
        raise
    yield pd, colocated
    colocated.stop()
    pd.stop()


def spec_counters(cluster, workers=None) -> dict[str, float]:
    """The speculation counters summed over the cluster's workers (or ``workers``; their
    /metrics), and how the decode workers took the head's states (``push`` / ``grpc``)."""
    out = dict.fromkeys([*COUNTERS, "push", "grpc"], 0.0)
    for w in cluster.workers if workers is None else workers:
        text = httpx.get(f"http://127.0.0.1:{w.ready_field('metrics_port')}/metrics").text
        for line in text.splitlines():
            for name in COUNTERS:
                if line.startswith(f"epdserve:spec_decode_{name}_total"):
                    out[name] += float(line.rsplit(" ", 1)[1])
            if line.startswith("epdserve:spec_decode_draft_states_handoffs_total"):
                path = line.split('path="', 1)[1].split('"', 1)[0]
                out[path] += float(line.rsplit(" ", 1)[1])
    return out


def states_room_at_rest(cluster) -> None:
    """Every worker's draft-states buffer is whole again: no region of a finished request
    (the decode side's, freed when claimed; the prefill side's, once its push is over) kept."""
    for w in cluster.workers:
        text = httpx.get(f"http://127.0.0.1:{w.ready_field('metrics_port')}/metrics").text
        free = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("epdserve:spec_decode_draft_states_free_bytes")]  # fmt: skip
        assert free == [64 << 20], (w.name, free)


def complete(url: str, prompt: list[int]) -> list[int]:
    r = httpx.post(
        url + "/v1/completions",
        json={"model": TINY_NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0,
              "ignore_eos": True, "logit_bias": {str(t): 100 for t in copy_bias()},
              "return_token_ids": True},
        timeout=120,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice.get("token_ids") or choice["text"]


def test_pd_drafts_and_accepts_as_colocated(clusters):
    """One request at a time on each: the decode worker's counters grow exactly as the
    co-located worker's (before the hand-off carried the head's inputs, the decode worker's
    first decode drafted nothing and its head had no KV for the prompt), tokens equal."""
    pd, colocated = clusters
    for prompt in repetitive_prompts()[:3]:
        before = spec_counters(colocated), spec_counters(pd)
        want = complete(colocated.base_url, prompt)
        got = complete(pd.base_url, prompt)
        assert got == want
        after = spec_counters(colocated), spec_counters(pd)
        grew = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
        assert grew[0]["num_drafts"] > 0
        paths = [(g.pop("push"), g.pop("grpc")) for g in grew]
        assert paths == [(0, 0), (1, 0)], grew  # pushed with the KV, not through the router
        assert grew[1] == grew[0], (prompt[:4], grew)
    states_room_at_rest(pd)


def test_extreme_parameters_kill_no_speculating_worker(clusters):
    """The queries of death (test_query_of_death's battery, and NaN / 1e300 temperatures) on
    EAGLE-3 workers, PD and co-located: each answered (200, or 400 in the API's format for
    what it refuses), no worker process replaced, and the tokens after as before."""
    for cluster in clusters:
        pids = {p.name: p.proc.pid for p in cluster.workers}
        prompt = repetitive_prompts()[0]
        reference = complete(cluster.base_url, prompt)
        with httpx.Client(base_url=cluster.base_url, timeout=120) as client:
            completions_battery(client, TINY_NAME, prompt)
        assert complete(cluster.base_url, prompt) == reference
        states_room_at_rest(cluster)
        assert all(p.alive() for p in cluster.workers)
        assert {p.name: p.proc.pid for p in cluster.workers} == pids
