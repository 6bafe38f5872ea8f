"""`epdserve bench` against a real local cluster (etcd, a worker process, the router).

The numbers must agree with what the server says it did: every request's output tokens
equal its usage block and the max_tokens asked for (ignore_eos honoured), the prompt tokens
the server counted equal the benchmark's own count, the router's token counters moved by
exactly the benchmark's totals, TTFT <= E2EL, and goodput <= throughput.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from services.cli import bench
from tests.cluster.cluster_helpers import TINY_NAME

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "benchmarks" / "data" / "sharegpt_sample.json"


@pytest.fixture(scope="module")
def cluster(llama_cluster):
    return llama_cluster  # shared with other modules (tests/conftest.py)


PROMPT_COUNTER = "epdserve:router_prompt_tokens_total"  # docs/metrics.md
GENERATION_COUNTER = "epdserve:router_generation_tokens_total"


def counters(base_url: str) -> dict[str, float]:
    """The router's token counters from /metrics, summed over their labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=10).text
    out = {PROMPT_COUNTER: 0.0, GENERATION_COUNTER: 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


def run_bench(tmp_path: Path, base_url: str, *flags: str) -> dict:
    out = tmp_path / "result.json"
    rc = bench.main(["--base-url", base_url, "--result-json", str(out), "--no-progress", *flags])
    assert rc == 0
    return json.loads(out.read_text())


def check_consistent(data: dict, n: int) -> None:
    assert data["completed"] == n and data["failed"] == 0, data["errors"]
    assert data["errors"] == {}
    reqs = data["requests"]
    assert len(reqs) == n
    for r in reqs:
        assert r["success"] and r["usage_reported"]
        assert r["output_tokens"] == r["expected_output_len"]  # ignore_eos + min_tokens honoured
        assert 1 <= r["chunks"] <= r["output_tokens"]
        assert len(r["itl"]) == r["chunks"] - 1
        assert 0 < r["ttft"] <= r["latency"]
    assert data["total_output_tokens"] == sum(r["output_tokens"] for r in reqs)
    assert data["total_input_tokens"] == sum(r["prompt_len"] for r in reqs)
    assert data["mean_ttft_ms"] <= data["mean_e2el_ms"]
    assert data["p99_ttft_ms"] <= data["p99_e2el_ms"]
    assert data["request_throughput"] == pytest.approx(n / data["duration_s"])
    assert data["output_throughput"] == pytest.approx(
        data["total_output_tokens"] / data["duration_s"]
    )
    if data["request_goodput"] is not None:
        assert data["request_goodput"] <= data["request_throughput"]


def test_random_completions_agree_with_the_server(cluster, tmp_path) -> None:
    before = counters(cluster.base_url)
    data = run_bench(
        tmp_path, cluster.base_url, "--dataset", "random", "--num-prompts", "8",
        "--request-rate", "20", "--input-len", "32", "--output-len", "12", "--range-ratio", "0.25",
        "--goodput", "ttft:60000", "tpot:60000", "e2el:120000", "--seed", "1",
    )  # fmt: skip
    after = counters(cluster.base_url)
    check_consistent(data, 8)
    assert data["model_id"] == TINY_NAME  # the first entry of /v1/models
    reqs = data["requests"]
    # /v1/completions: the server tokenizes the same text into the same count.
    assert all(r["server_prompt_tokens"] == r["prompt_len"] for r in reqs)
    assert len({r["expected_output_len"] for r in reqs}) > 1  # --range-ratio was applied
    # The router's counters moved by the timed requests plus the warm-up (request 0 again).
    warm_out, warm_in = reqs[0]["expected_output_len"], reqs[0]["prompt_len"]
    done_out = after[GENERATION_COUNTER] - before[GENERATION_COUNTER]
    done_in = after[PROMPT_COUNTER] - before[PROMPT_COUNTER]
    assert done_out == data["total_output_tokens"] + warm_out
    assert done_in == data["total_input_tokens"] + warm_in
    # Generous SLOs: every request is good.
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])


def test_chat_prefix_groups_under_a_concurrency_cap(cluster, tmp_path) -> None:
    data = run_bench(
        tmp_path, cluster.base_url + "/v1", "--endpoint", "chat", "--dataset", "prefix",
        "--prefix-groups", "2", "--prefix-len", "64", "--input-len", "16", "--num-prompts", "6",
        "--output-len", "8", "--max-concurrency", "2", "--goodput", "tpot:0.001",
    )  # fmt: skip
    check_consistent(data, 6)
    assert data["max_concurrent"] <= 2
    # The chat template adds tokens around the system and user messages.
    assert all(r["server_prompt_tokens"] > r["prompt_len"] for r in data["requests"])
    assert data["request_goodput"] == 0.0 < data["request_throughput"]  # nobody meets 1 us TPOT
    # Later prompts of a group find the shared system prefix in the engine's prefix cache.
    assert data["total_cached_tokens"] is not None and data["total_cached_tokens"] >= 32


def test_sharegpt_sample(cluster, tmp_path) -> None:
    data = run_bench(
        tmp_path, cluster.base_url, "--dataset", "sharegpt", "--dataset-path", str(SAMPLE),
        "--num-prompts", "5", "--output-len", "10", "--request-rate", "inf",
    )  # fmt: skip
    check_consistent(data, 5)
    assert all(r["server_prompt_tokens"] == r["prompt_len"] for r in data["requests"])


def test_epdserve_bench_command(cluster, tmp_path) -> None:
    """The installed entry point, as a user runs it: table on stdout, JSON on request."""
    out = tmp_path / "cli.json"
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "bench", "--base-url", cluster.base_url,
         "--num-prompts", "3", "--input-len", "16", "--output-len", "4", "--no-warmup",
         "--result-json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout and "Successful requests:" in proc.stdout
    assert "3/3 (0 failed)" in proc.stderr  # the progress line
    check_consistent(json.loads(out.read_text()), 3)
