"""Measurement accuracy: `epdserve bench` against a real server with known timings.

services/bench/paced_server.py sends the first token after TTFT and one more every ITL, so
the right answers are known: TTFT ~ 100 ms, TPOT = ITL ~ 10 ms, E2EL ~ 100 + 19 * 10 ms, and
a closed loop of C requests completes C / E2EL requests per second. Bounds are loose on the
slow side only (a busy CI machine adds delay, it never removes it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.bench.paced_server import READY_PREFIX
from services.cli import bench
from services.common.net import free_port

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
TTFT_MS, ITL_MS, OUT = 100.0, 10.0, 20
E2EL_MS = TTFT_MS + (OUT - 1) * ITL_MS
SLACK_MS = 60.0  # scheduling delay allowed on a loaded machine


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


def run(tmp_path: Path, url: str, *flags: str) -> dict:
    out = tmp_path / "r.json"
    # --tokenizer: the default model's; prompts are random text, the server only counts words.
    rc = bench.main(["--base-url", url, "--input-len", "16", "--output-len", str(OUT),
                     "--no-progress", "--result-json", str(out), *flags])  # fmt: skip
    assert rc == 0
    return json.loads(out.read_text())


def test_closed_loop_timings(paced_url, tmp_path) -> None:
    d = run(tmp_path, paced_url, "--num-prompts", "24", "--request-rate", "inf",
            "--max-concurrency", "4", "--goodput", f"ttft:{TTFT_MS + SLACK_MS}")  # fmt: skip
    assert d["completed"] == 24 and d["failed"] == 0
    assert TTFT_MS <= d["median_ttft_ms"] <= TTFT_MS + SLACK_MS
    assert ITL_MS <= d["median_tpot_ms"] <= ITL_MS + 5.0
    assert ITL_MS - 3.0 <= d["median_itl_ms"] <= ITL_MS + 5.0
    assert E2EL_MS <= d["median_e2el_ms"] <= E2EL_MS + SLACK_MS
    assert d["max_concurrent"] == 4
    ideal = 4 / (E2EL_MS / 1000.0)  # 13.8 req/s
    assert 0.7 * ideal <= d["request_throughput"] <= ideal * 1.02
    assert d["output_throughput"] == pytest.approx(d["request_throughput"] * OUT)
    assert d["request_goodput"] <= d["request_throughput"]
    for r in d["requests"]:
        assert r["chunks"] == r["output_tokens"] == OUT and len(r["itl"]) == OUT - 1


def test_open_loop_rate_sets_the_pace(paced_url, tmp_path) -> None:
    # Near-constant gaps of 50 ms: 16 requests span 15 gaps, then the last one runs.
    d = run(tmp_path, paced_url, "--num-prompts", "16", "--request-rate", "20",
            "--burstiness", "1000")  # fmt: skip
    assert d["completed"] == 16
    expected_s = 15 * 0.05 + E2EL_MS / 1000.0
    assert expected_s * 0.9 <= d["duration_s"] <= expected_s + 0.5
    starts = sorted(r["start"] for r in d["requests"])
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.05, rel=0.15)
    assert TTFT_MS <= d["median_ttft_ms"] <= TTFT_MS + SLACK_MS
