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
from collections.abc import Callable
from functools import partial

import grpc
import httpx
import pytest
from cluster_helpers import (
    TINY_NAME,
    epdserve_up,
    generated,
    migrations,
    signal_mid_request,
    sse_data,
    start_cluster,
    wait_for,
    worker_health,
)

from services.cli.children import ManagedProcess
from services.cli.launcher import WORKER_ENV_DEFAULTS, WORKER_READY
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

MAX_TOKENS = 200
REQ = {"model": TINY_NAME, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS,
       "temperature": 0, "ignore_eos": True, "logprobs": 1}  # fmt: skip
ATTEMPTS = 5  # requests tried for one in which the kill lands while the worker generates


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


def kill_after_tokens(proc, start: float, running: Callable[[], bool]) -> threading.Thread | None:
    """Kill -9 ``proc`` once it made 8 tokens of our request (``signal_mid_request``) and
    restart it as a supervisor would: the restarter, to join; None where the worker had
    finished the request (a kill then tests nothing)."""
    if not signal_mid_request(proc, signal.SIGKILL, start, MAX_TOKENS, running):
        return None
    return restart_after_exit(proc)


def resumed(c, restarter: threading.Thread | None, before: float) -> bool:
    """After a request a kill was tried on: whether the router resumed it on the restart (a
    migration counted); else the worker had sent all its tokens just before the kill, and
    the next attempt waits until the restarted worker is routed again."""
    if restarter is None:
        print("the worker finished the request before the kill: again", flush=True)
        return False
    restarter.join(timeout=60)
    if migrations(c.base_url, "died") == before + 1:
        return True
    print("the kill landed after the worker's last token: again", flush=True)
    deadline = time.monotonic() + 180
    while not (c.workers[0].is_ready() and reachable(c)):
        assert c.workers[0].returncode() is None, c.workers[0].describe_failure()
        assert time.monotonic() < deadline, "the restarted worker is not routed within 180 s"
        time.sleep(0.1)
    return False


def post(base_url: str, result: dict) -> None:
    result["r"] = httpx.post(base_url + "/v1/completions", json=REQ, timeout=180)


def reachable(c) -> bool:
    workers = worker_health(c.base_url, c.admin_token)[1]["workers"]
    return any(v["reachable"] for v in workers.values())


# NOTE: one cluster at a time (the CI machine's memory): each class's cluster stops after
# its last test, before the next class starts its own.
@pytest.fixture(scope="class")
def one_mixed(tiny_model_dir):
    # The restart wait, which also bounds a worker's start (120 s; the default is 60 s): a
    # worker start took up to 47 s at load 20-25 here.
    c = start_cluster(tiny_model_dir("llama"), workers=1,
                      router_overrides={"worker_restart_wait_s": 120.0})  # fmt: skip
    yield c
    c.stop()


def late_worker(c, index: int, served: str) -> ManagedProcess:
    """A worker of the tiny model started now beside the cluster's, serving it as ``served``
    (a model no other worker serves: the router has no record of it)."""
    argv = c.worker_argv(index)
    argv[argv.index("--served-model-name") + 1] = served
    return ManagedProcess(f"worker-{index}", argv, WORKER_READY, False,
                          {**c.etcd.access.to_env(), **WORKER_ENV_DEFAULTS})  # fmt: skip


def starting_rows(c) -> dict[str, dict]:
    auth = {"Authorization": f"Bearer {c.admin_token}"}
    st = httpx.get(c.base_url + "/admin/status", headers=auth, timeout=30).json()
    return {s["id"]: s for s in st["starting"]}


class TestOneMixedWorker:
    def test_the_one_mixed_worker_killed_mid_stream_resumes_on_its_restart(self, one_mixed) -> None:
        c = one_mixed
        ref = httpx.post(c.base_url + "/v1/completions", json=REQ, timeout=120)
        assert ref.status_code == 200, ref.text
        body = {**REQ, "stream": True}
        for _ in range(ATTEMPTS):
            before, start = migrations(c.base_url, "died"), generated(c.workers[0])
            with httpx.stream("POST", c.base_url + "/v1/completions", json=body, timeout=180) as r:
                assert r.status_code == 200
                # NOTE: the kill is timed by the worker's tokens, not by what this client
                # read: at load it read its eighth token after the worker had made all 200.
                restarter = kill_after_tokens(c.workers[0], start, lambda: True)
                tokens = [t for event in sse_data(r)  # an error event (no_workers) fails
                          for t in (event["choices"][0].get("logprobs") or {}).get("tokens", [])]  # fmt: skip
            assert tokens == tokens_of(ref.json())
            if resumed(c, restarter, before):
                return
        raise AssertionError(f"no kill landed on a running request in {ATTEMPTS} attempts")

    def test_a_non_streaming_request_resumes_on_the_restart_too(self, one_mixed) -> None:
        c = one_mixed
        ref = httpx.post(c.base_url + "/v1/completions", json=REQ, timeout=120)
        assert ref.status_code == 200, ref.text
        for _ in range(ATTEMPTS):
            before, start = migrations(c.base_url, "died"), generated(c.workers[0])
            result: dict = {}
            caller = threading.Thread(target=post, args=(c.base_url, result), daemon=True)
            caller.start()
            restarter = kill_after_tokens(c.workers[0], start, caller.is_alive)
            caller.join(timeout=180)
            r = result["r"]
            assert r.status_code == 200, r.text
            assert tokens_of(r.json()) == tokens_of(ref.json())
            if resumed(c, restarter, before):
                return
        raise AssertionError(f"no kill landed on a running request in {ATTEMPTS} attempts")

    def test_a_request_sent_while_its_only_worker_starts_waits_for_it(self, one_mixed) -> None:
        """While a worker starts (imports, model load) the router lists it as starting, and
        a request for its model waits for it and succeeds, greedy tokens those of the same
        model served under the cluster's name (before: 404, the router knew nothing of the
        worker). A worker killed while starting is seen gone at once (its process, not its
        lease's end): a request for its model gets a 503 with Retry-After, not a wait and then
        a 404 model_not_found once its lease ran out (session 19)."""
        c = one_mixed
        body = {"model": "tiny-late", "prompt": "Once upon a time", "max_tokens": 8,
                "temperature": 0, "ignore_eos": True, "logprobs": 1}  # fmt: skip
        ref = httpx.post(c.base_url + "/v1/completions", json={**body, "model": TINY_NAME},
                         timeout=120)  # fmt: skip
        assert ref.status_code == 200, ref.text
        # Both at once: the killed one's lease (15 s) runs out while the other starts.
        dies, late = late_worker(c, 91, "tiny-dies"), late_worker(c, 90, "tiny-late")
        try:
            seen: dict[str, dict] = {}
            wait_for(lambda: {"worker-90", "worker-91"} <= seen.keys()
                     or bool(seen.update(starting_rows(c))), 120, "both starting", 0.1)  # fmt: skip
            dies.kill()
            wait_for(lambda: "worker-91" not in starting_rows(c), 10, "worker-91 gone", 0.1)
            gone = httpx.post(c.base_url + "/v1/completions", json={**body, "model": "tiny-dies"},
                              timeout=60)  # fmt: skip
            assert gone.status_code == 503 and gone.json()["error"]["code"] == "no_workers"
            assert 1 <= int(gone.headers["Retry-After"]) <= 5, gone.headers
            assert seen["worker-90"]["model"] == "tiny-late"
            assert not late.is_ready()  # the request goes while the worker starts
            r = httpx.post(c.base_url + "/v1/completions", json=body, timeout=180)
            assert r.status_code == 200, (r.text, late.last_output())
            assert tokens_of(r.json()) == tokens_of(ref.json())
        finally:
            dies.stop(timeout=10)
            late.stop(timeout=30)


UP_ENGINE = ["--engine-arg", "max_model_len=512", "--engine-arg",
             f"kv_cache_bytes={32 * 1024 * 1024}", "--engine-arg", "max_num_seqs=16"]  # fmt: skip


def killed_under_up(base: str, req: dict, old: dict) -> tuple[list[str], bool]:
    """Stream ``req`` and kill -9 the worker of the status row ``old`` at the first token if
    it still runs the request; (the tokens the client got, whether it was killed).

    NOTE: at the first token, not the 8th, asked on a channel opened beforehand: the worker
    must still be generating for the kill to test anything, and with 200 tokens it had
    finished first in 3 of 5 attempts (load ~20)."""
    tokens: list[str] = []
    tried = killed = False
    with grpc.insecure_channel(old["address"], options=[("grpc.enable_http_proxy", 0)]) as ch:
        health = pb_grpc.WorkerServiceStub(ch).Health
        health(pb.HealthRequest(), timeout=10)  # connected
        with httpx.stream("POST", base + "/v1/completions", json={**req, "stream": True},
                          timeout=240) as r:  # fmt: skip
            assert r.status_code == 200
            for event in sse_data(r):  # an error event (no_workers) fails the test
                tokens += (event["choices"][0].get("logprobs") or {}).get("tokens", [])
                if not tried and tokens:
                    tried = True
                    if health(pb.HealthRequest(), timeout=10).num_inflight:
                        os.kill(old["pid"], signal.SIGKILL)
                        killed = True
    return tokens, killed


# One `up` serves both kills: the same tiny model as two served models, one on a PD pair
# (the one decode worker is killed) and one on a mixed worker (the only worker of its model is
# killed). The router keeps a pool per model: neither's request can go to the other's workers.
MODEL_OF = {"decode": "tiny-pd", "mixed": "tiny-mixed"}


def worker_row(base: str, cfg_dir, role: str):
    """A function that reads the status row of the one worker of ``role`` (None: none yet)."""
    token = (cfg_dir / "admin-token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}

    def row() -> dict | None:
        rows = httpx.get(base + "/admin/status", headers=auth, timeout=30).json()["workers"]
        found = [w for w in rows if w["role"] == role and w["state"] == "serving"]
        return found[0] if len(found) == 1 else None

    return row


def restarted(row_of, old_pid: int) -> dict | None:
    """The worker's row once a new process of it serves (``up`` restarted it)."""
    row = row_of()
    return row if row is not None and row["pid"] != old_pid else None


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
        # 480 tokens (of max_model_len 512): a longer window for the kill to land in.
        req = {**REQ, "model": MODEL_OF[role], "max_tokens": 480}
        ref = httpx.post(base + "/v1/completions", json=req, timeout=120)
        assert ref.status_code == 200, ref.text
        row_of = worker_row(base, cfg_dir, role)
        for _ in range(ATTEMPTS):
            before, old = migrations(base, "died"), wait_for(row_of, 180, f"the {role} worker")
            tokens, killed = killed_under_up(base, req, old)
            assert tokens == tokens_of(ref.json())
            if not killed:
                print(f"the {role} worker finished the request first: again", flush=True)
                continue
            new = wait_for(partial(restarted, row_of, old["pid"]), 180, f"{role} restarted")
            assert new["id"] == old["id"]
            if migrations(base, "died") == before + 1:  # it went on on the restart
                return
            print(f"the kill landed after the {role} worker's last token: again", flush=True)
        raise AssertionError(f"no kill landed on a running request in {ATTEMPTS} attempts")
