"""Measurement: `epdserve bench` against a real server with known timings.

services/bench/paced_server.py sends the first token TTFT after a request arrives and one more
every ITL after that, so nothing can arrive sooner: every TTFT >= 100 ms, every E2EL >= 100 +
19 * 10 ms, and a closed loop of C requests at a time completes at most C / E2EL requests per
second. A busy machine only adds delay, so the checks here are those lower bounds, the upper
bound of the test's own wall clock (seconds, not milliseconds), and the relations between
the per-request records and the summaries (medians, TPOT, throughput, goodput), which hold
at any load. (How close the numbers come to the server's timings on a quiet machine is a
benchmark's question, not a test's: a load of 20 added 65 ms to every E2EL.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from services.bench.paced_server import READY_PREFIX
from services.cli import bench
from services.common.net import free_port

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
TTFT_MS, ITL_MS, OUT = 100.0, 10.0, 20
E2EL_MS = TTFT_MS + (OUT - 1) * ITL_MS
GOODPUT_TTFT_MS = 160.0  # an SLO some requests may miss on a loaded machine


@pytest.fixture(scope="module")
def paced_url():
    port = free_port("127.0.0.1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.bench.paced_server", "--port", str(port),
         "--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and not line.startswith(READY_PREFIX):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"paced server exited with {proc.returncode}")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 200
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run(tmp_path: Path, url: str, *flags: str) -> tuple[dict, float]:
    """The result JSON of one benchmark run, and the run's wall time (s) seen from here."""
    out = tmp_path / "r.json"
    started = time.perf_counter()
    # --tokenizer: the default model's; prompts are random text, the server only counts words.
    rc = bench.main(["--base-url", url, "--input-len", "16", "--output-len", str(OUT),
                     "--no-progress", "--result-json", str(out), *flags])  # fmt: skip
    wall = time.perf_counter() - started
    assert rc == 0
    return json.loads(out.read_text()), wall


def median_ms(seconds: list[float]) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, 50))


def check_requests(d: dict, wall: float) -> None:
    """Every request's record: the server's floors, the run's wall time, TPOT and ITL from
    its own times; the summaries are those of the records."""
    reqs = d["requests"]
    for r in reqs:
        assert r["chunks"] == r["output_tokens"] == OUT and len(r["itl"]) == OUT - 1
        assert TTFT_MS / 1000 <= r["ttft"] <= r["latency"] <= wall
        assert r["latency"] >= E2EL_MS / 1000
        # The gaps between chunks fit between the first chunk and the stream's end.
        assert r["ttft"] + sum(r["itl"]) <= r["latency"] + 1e-6
    assert d["median_ttft_ms"] == pytest.approx(median_ms([r["ttft"] for r in reqs]))
    assert d["median_e2el_ms"] == pytest.approx(median_ms([r["latency"] for r in reqs]))
    tpots = [(r["latency"] - r["ttft"]) / (OUT - 1) for r in reqs]
    assert d["median_tpot_ms"] == pytest.approx(median_ms(tpots))
    assert d["median_itl_ms"] == pytest.approx(median_ms([x for r in reqs for x in r["itl"]]))
    assert E2EL_MS / 1000 <= d["duration_s"] <= wall
    assert d["request_throughput"] == pytest.approx(d["completed"] / d["duration_s"])
    assert d["output_throughput"] == pytest.approx(d["request_throughput"] * OUT)


def test_closed_loop_timings(paced_url, tmp_path) -> None:
    d, wall = run(tmp_path, paced_url, "--num-prompts", "24", "--request-rate", "inf",
                  "--max-concurrency", "4", "--goodput", f"ttft:{GOODPUT_TTFT_MS}")  # fmt: skip
    assert d["completed"] == 24 and d["failed"] == 0
    check_requests(d, wall)
    assert d["max_concurrent"] == 4
    # Six rounds of four requests, each at least one E2EL long: at most 13.8 req/s.
    assert d["duration_s"] >= 6 * E2EL_MS / 1000
    assert d["request_throughput"] <= 4 / (E2EL_MS / 1000.0) * 1.02
    good = sum(r["ttft"] * 1000 <= GOODPUT_TTFT_MS for r in d["requests"])
    assert d["request_goodput"] == pytest.approx(good / d["duration_s"])


def test_open_loop_rate_sets_the_pace(paced_url, tmp_path) -> None:
    # Near-constant gaps of 50 ms (each measured from the previous send: a late send delays
    # the later ones, never hurries them): 16 requests span 15 gaps, then the last one runs.
    d, wall = run(tmp_path, paced_url, "--num-prompts", "16", "--request-rate", "20",
                  "--burstiness", "1000")  # fmt: skip
    assert d["completed"] == 16 and d["failed"] == 0
    check_requests(d, wall)
    starts = sorted(r["start"] for r in d["requests"])
    assert starts[-1] - starts[0] >= 0.9 * 15 * 0.05
    assert d["duration_s"] >= 0.9 * 15 * 0.05 + E2EL_MS / 1000.0
    # Sent on the schedule, not one after another's end: E2EL (>= 290 ms) spans several gaps.
    assert d["max_concurrent"] >= 2
