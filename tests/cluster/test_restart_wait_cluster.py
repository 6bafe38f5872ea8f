"""The only worker of a role killed (-9) mid-request: the router waits for it to be restarted
(--worker-restart-wait-s) and the request goes on there from its tokens, greedy output equal
to an undisturbed run's, nothing lost or repeated. Through the cluster harness (the one mixed
worker killed, restarted as a supervisor does) and through `epdserve up` (the one decode
worker of a PD pair, and the only worker of another model, a mixed one, killed; `up` restarts
them)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from cluster_helpers import TINY_NAME, epdserve_up, sse_data, start_cluster, worker_health

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

MAX_TOKENS = 200
REQ = {"model": TINY_NAME, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS,
       "temperature": 0, "ignore_eos": True, "logprobs": 1}  # fmt: skip


def tokens_of(body: dict) -> list[str]:
    return body["choices"][0]["logprobs"]["tokens"]


def restart_after_exit(proc, delay: float = 1.0) -> threading.Thread:
    """What a supervisor does: once ``proc`` exited, start it again ``delay`` s later."""

    def run() -> None:
        deadline = time.monotonic() + 30
        while proc.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.restart()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def busy(cluster) -> bool:
    workers = worker_health(cluster.base_url, cluster.admin_token)[1]["workers"]
    return any(v["inflight"] > 0 for v in workers.values())


# NOTE: one cluster at a time (the CI machine's memory): each class's cluster stops after
# its last test, before the next class starts its own.
@pytest.fixture(scope="class")
def one_mixed(tiny_model_dir):
    c = start_cluster(tiny_model_dir("llama"), workers=1)  # the default wait: 60 s
    yield c
    c.stop()


class TestOneMixedWorker:
    def test_the_one_mixed_worker_killed_mid_stream_resumes_on_its_restart(self, one_mixed) -> None:
        c = one_mixed
        ref = httpx.post(c.base_url + "/v1/completions", json=REQ, timeout=120)
        assert ref.status_code == 200, ref.text
        tokens: list[str] = []
        restarter = None
        body = {**REQ, "stream": True}
        with httpx.stream("POST", c.base_url + "/v1/completions", json=body, timeout=180) as r:
            assert r.status_code == 200
            for event in sse_data(r):  # an error event (no_workers) fails the test
                tokens += (event["choices"][0].get("logprobs") or {}).get("tokens", [])
                if restarter is None and len(tokens) >= 8:
                    assert len(tokens) < MAX_TOKENS // 2, "the stream ended too soon to test"
                    c.workers[0].kill()
                    restarter = restart_after_exit(c.workers[0])
        assert restarter is not None
        restarter.join(timeout=60)
        assert tokens == tokens_of(ref.json())

    def test_a_non_streaming_request_resumes_on_the_restart_too(self, one_mixed) -> None:
        c = one_mixed
        ref = httpx.post(c.base_url + "/v1/completions", json=REQ, timeout=120)
        assert ref.status_code == 200, ref.text
        result: dict = {}

        def call() -> None:
            result["r"] = httpx.post(c.base_url + "/v1/completions", json=REQ, timeout=180)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        deadline = time.monotonic() + 30
        while not busy(c) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # a few tokens in (or still in its prefill: it goes to the restart too)
        c.workers[0].kill()
        restart_after_exit(c.workers[0]).join(timeout=60)
        caller.join(timeout=180)
        r = result["r"]
        assert r.status_code == 200, r.text
        assert tokens_of(r.json()) == tokens_of(ref.json())


UP_ENGINE = ["--engine-arg", "max_model_len=512", "--engine-arg",
             f"kv_cache_bytes={32 * 1024 * 1024}", "--engine-arg", "max_num_seqs=16"]  # fmt: skip


def killed_under_up(base: str, req: dict, pid_of) -> list[str]:
    """Stream ``req`` and kill -9 the process ``pid_of()`` names after 8 tokens; the tokens
    the client got. Checks the stream went on on a new process."""
    old_pid = pid_of()
    tokens: list[str] = []
    killed = False
    with httpx.stream("POST", base + "/v1/completions", json={**req, "stream": True},
                      timeout=240) as r:  # fmt: skip
        assert r.status_code == 200
        for event in sse_data(r):  # an error event (no_workers) fails the test
            tokens += (event["choices"][0].get("logprobs") or {}).get("tokens", [])
            if not killed and len(tokens) >= 8:
                assert len(tokens) < MAX_TOKENS // 2, "the stream ended too soon to test"
                os.kill(old_pid, signal.SIGKILL)
                killed = True
    assert killed
    assert pid_of() != old_pid  # it went on on the restarted process
    return tokens


# One `up` serves both kills: the same tiny model as two served models, one on a PD pair
# (the one decode worker is killed) and one on a mixed worker (the only worker of its model is
# killed). The router keeps a pool per model: neither's request can go to the other's workers.
MODEL_OF = {"decode": "tiny-pd", "mixed": "tiny-mixed"}


def worker_pid(base: str, cfg_dir, role: str):
    token = (cfg_dir / "admin-token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}

    def pid() -> int:
        rows = httpx.get(base + "/admin/status", headers=auth, timeout=30).json()["workers"]
        (row,) = [w for w in rows if w["role"] == role]
        return row["pid"]

    return pid


@pytest.fixture(scope="class")
def up_pd_and_mixed(tiny_model_dir, tmp_path_factory):
    """`epdserve up` of a PD pair and a mixed worker, each its own model: (base URL, the
    operator's config folder)."""
    tmp = tmp_path_factory.mktemp("up")
    model = str(tiny_model_dir("llama"))
    groups = tmp / "models.json"
    groups.write_text(json.dumps([
        {"model": model, "served_model_name": MODEL_OF["decode"], "mixed": 0, "prefill": 1,
         "decode": 1},
        {"model": model, "served_model_name": MODEL_OF["mixed"], "mixed": 1},
    ]))  # fmt: skip
    args = ["--models-file", str(groups), "--no-kvstore", "--cluster", "restartwait", *UP_ENGINE]
    with epdserve_up(tmp, *args) as (_proc, base, _env):
        yield base, tmp / "cfg"


class TestUp:
    @pytest.mark.parametrize("role", ["decode", "mixed"])
    def test_the_one_worker_killed_under_up_resumes_on_its_restart(
        self, up_pd_and_mixed, role: str
    ) -> None:
        """decode: the one decode worker of a PD pair; mixed: the only worker of its model."""
        base, cfg_dir = up_pd_and_mixed
        req = {**REQ, "model": MODEL_OF[role]}
        ref = httpx.post(base + "/v1/completions", json=req, timeout=120)
        assert ref.status_code == 200, ref.text
        tokens = killed_under_up(base, req, worker_pid(base, cfg_dir, role))
        assert tokens == tokens_of(ref.json())
