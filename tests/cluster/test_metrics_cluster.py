"""A live cluster's Prometheus metrics: every metric a dashboard queries is exported by the
router or a worker, and the counters follow the requests sent."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from cluster_helpers import TINY_NAME, start_cluster
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "epdserve" / "dashboards"
NAME = re.compile(r"\bepdserve:[A-Za-z0-9_:]+")
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
MAX_TOKENS = 5
N_COMPLETIONS, N_CHAT_STREAMS, N_MESSAGES = 3, 2, 1
N_REQUESTS = N_COMPLETIONS + N_CHAT_STREAMS + N_MESSAGES


def dashboard_metric_names() -> set[str]:
    """Every metric name (as a sample name: ``x_bucket``, ``y_total``) in a panel query."""
    names: set[str] = set()

    def walk(panels: list[dict]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                names.update(NAME.findall(t["expr"]))

    for f in sorted(DASHBOARDS.glob("*.json")):
        walk(json.loads(f.read_text())["panels"])
    return names


class Scrape:
    """One scrape of several endpoints: ``value(name, **labels)`` sums matching samples."""

    def __init__(self, urls: list[str]) -> None:
        self.samples = []
        for url in urls:
            text = httpx.get(url, timeout=5).text
            for family in text_string_to_metric_families(text):
                self.samples += family.samples

    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def value(self, name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    # Speculating workers, so that the speculative-decoding panels' metrics are exported too
    # (a worker exports them only when it speculates, as vLLM does).
    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    c = start_cluster(
        tiny_model_dir("llama"), workers=2, engine_overrides={"speculative_config": spec}
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def traffic(cluster) -> dict[str, int]:
    """Send the module's requests once; returns the completion tokens the API reported."""
    base = cluster.base_url
    extra = {"temperature": 0, "ignore_eos": True, "max_tokens": MAX_TOKENS}
    tokens = 0
    with httpx.Client(base_url=base, timeout=60) as http:
        for _ in range(N_COMPLETIONS):
            r = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": PROMPT, **extra})
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["completion_tokens"]
        chat = {"model": TINY_NAME, "messages": [{"role": "user", "content": PROMPT}],
                "stream": True, "stream_options": {"include_usage": True}, **extra}  # fmt: skip
        for _ in range(N_CHAT_STREAMS):
            with http.stream("POST", "/v1/chat/completions", json=chat) as r:
                assert r.status_code == 200
                events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: {")]
            tokens += json.loads(events[-1])["usage"]["completion_tokens"]
        msg = {"model": TINY_NAME, "max_tokens": MAX_TOKENS, "temperature": 0,
               "messages": [{"role": "user", "content": PROMPT}]}  # fmt: skip
        for _ in range(N_MESSAGES):
            r = http.post("/v1/messages", json=msg)
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["output_tokens"]
        # One refused request (unknown model): an outcome other than success.
        bad = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert bad.status_code == 404
    return {"completion_tokens": tokens}


def scrape_all(cluster) -> Scrape:
    urls = [cluster.base_url + "/metrics"]
    urls += [f"http://127.0.0.1:{w.ready_field('metrics_port')}/metrics" for w in cluster.workers]
    return Scrape(urls)


def settled(cluster) -> Scrape:
    """A scrape taken once every request's end has been counted by the workers (a worker
    counts the end right after relaying the last output, a hair after the client has it)."""
    deadline = time.monotonic() + 10
    while True:
        s = scrape_all(cluster)
        if s.value("epdserve:request_success_total") >= N_REQUESTS or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def test_every_dashboard_metric_is_exported(cluster, traffic) -> None:
    wanted = dashboard_metric_names()
    assert len(wanted) > 20, wanted
    exported = settled(cluster).names()
    missing = sorted(wanted - exported)
    assert not missing, f"dashboards query metrics no process exports: {missing}"


def test_counters_follow_the_requests(cluster, traffic) -> None:
    s = settled(cluster)
    n = N_REQUESTS
    # Workers: one TTFT / E2E observation per request, every generated token counted.
    assert s.value("epdserve:time_to_first_token_seconds_count") == n
    assert s.value("epdserve:e2e_request_latency_seconds_count") == n
    assert s.value("epdserve:time_per_output_token_seconds_count") == n
    assert s.value("epdserve:inter_token_latency_seconds_count") == n * (MAX_TOKENS - 1)
    assert s.value("epdserve:generation_tokens_total") == traffic["completion_tokens"] > 0
    assert s.value("epdserve:prompt_tokens_total") >= n * 10
    assert s.value("epdserve:request_success_total", finished_reason="length") == n
    assert s.value("epdserve:request_success_total", finished_reason="abort") == 0
    assert s.value("epdserve:prefix_cache_queries_total") >= s.value("epdserve:prompt_tokens_total")
    assert s.value("epdserve:num_requests_running") == 0
    assert s.value("epdserve:role_flips_total") == 0
    assert s.value("epdserve:worker_role", role="mixed") == 2
    # Each worker labels its series with its own id.
    instances = {x.labels.get("instance") for x in s.samples if x.name == "epdserve:worker_role"}
    assert instances == {"worker-0", "worker-1"}
    # Router: outcomes, client-side latency, tokens, membership.
    assert s.value("epdserve:router_requests_total", outcome="success") == n
    assert s.value("epdserve:router_requests_total", api="completions", outcome="invalid") == 1
    assert s.value("epdserve:router_time_to_first_token_seconds_count") == n
    assert s.value("epdserve:router_e2e_request_latency_seconds_count", api="chat") == (
        N_CHAT_STREAMS
    )
    assert (
        s.value("epdserve:router_generation_tokens_total", model_name=TINY_NAME)
        == (traffic["completion_tokens"])
    )
    assert s.value("epdserve:workers", role="mixed", state="serving") == 2
    assert s.value("epdserve:router_num_requests_running") == 0
    # Fed by the PD code and the rebalancer: exported at zero until then. A rebalancing
    # round may have run meanwhile (a slow machine): the static policy only ever holds.
    assert s.value("epdserve:kv_transfer_bytes_total") == 0
    assert "epdserve:rebalance_decisions_total" in s.names()
    assert s.value("epdserve:rebalance_decisions_total") == s.value(
        "epdserve:rebalance_decisions_total", action="hold"
    )


def test_speculation_through_the_router(cluster, tiny_model_dir) -> None:
    """Greedy completions from the speculating workers, through the router, equal the offline
    engine's without speculation on a prompt the output copies from (a logit bias keeps the
    random model's output within the prompt's tokens), with speculation on and opted out of;
    the workers accepted drafts and ``epdserve status`` shows it per worker. NOTE: last in the
    module: it sends requests that the counters above do not expect."""
    from cluster_helpers import cli, status
    from test_migration import verifications

    from services.engine import LLM, SamplingParams

    model = str(tiny_model_dir("llama"))
    offline = LLM(model, dtype="float32", max_model_len=512, kv_cache_bytes=32 << 20)
    prompt = "def add(a, b):\n    return a + b\n\n" * 4
    ids = offline.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bias = {str(t): 100.0 for t in set(ids)}
    want = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                            logit_bias={int(t): b for t, b in bias.items()}))[0].outputs[0].text  # fmt: skip

    def accepted() -> int:
        workers = status(cluster)["workers"]
        return sum((w["speculation"] or {}).get("accepted_tokens", 0) for w in workers)

    before = accepted()
    body = {"model": TINY_NAME, "prompt": prompt, "temperature": 0, "max_tokens": 32,
            "ignore_eos": True, "logit_bias": bias}  # fmt: skip
    with httpx.Client(base_url=cluster.base_url, timeout=60) as http:
        for extra in ({}, {"speculative": False}, {}):
            drafts = sum(verifications(cluster).values())
            r = http.post("/v1/completions", json={**body, **extra})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
            # The opted-out request drafts nothing, the others do (the workers' counters).
            grew = sum(verifications(cluster).values()) - drafts
            assert (grew > 0) == (extra == {}), (extra, grew)
    deadline = time.monotonic() + 10  # load reports carry the counters, every second or so
    while accepted() <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert accepted() > before
    table = cli(cluster, "status")
    assert table.returncode == 0, table.stderr
    assert "SPEC" in table.stdout and re.search(r"\d+%x\d\.\d", table.stdout), table.stdout
