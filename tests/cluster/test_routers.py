"""Two router replicas over two workers: `epdserve status` points at the process serving a
request, whichever router it came through; kill -9 of the leading router loses only its
own connections, and the other router takes over the rebalancer."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from cluster_helpers import TINY_NAME, start_cluster

from services.cli import up
from services.cli.cluster_spec import ClusterSpec
from services.cli.launcher import LocalCluster

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

REQ = {"model": TINY_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    c = start_cluster(tiny_model_dir("llama"), workers=2, routers=2)
    yield c
    c.stop()


def _cli(cluster, url: str, *args: str) -> str:
    """`epdserve ARGS` against the router at ``url``, as an operator runs it; its stdout."""
    r = subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args,
         "--router", url, "--admin-token", cluster.admin_token],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def _status(cluster, url: str) -> dict:
    """`epdserve status --json`."""
    return json.loads(_cli(cluster, url, "status", "--json"))


def _wait(pred, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


class LongStream:
    """A streaming completion through one router, read in a thread; ``id`` once it started."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.id: str | None = None
        self.started = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        body = {**REQ, "max_tokens": 480, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and self.id is None:
                        self.id = json.loads(line[6:])["id"]
                        self.started.set()
        finally:
            self.started.set()
            self.done.set()

    def join(self) -> None:
        self._thread.join(timeout=120)


def test_router_replicas_take_consecutive_ports() -> None:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    assert parser.parse_args(["--routers", "3"]).routers == 3
    local = LocalCluster(ClusterSpec(port=9000, routers=3))
    try:
        ports = [argv[argv.index("--port") + 1] for argv in map(local.router_argv, range(3))]
        assert ports == ["9000", "9001", "9002"]
    finally:
        local.stop()
    with pytest.raises(ValueError, match="need 1 to 256 routers"):
        ClusterSpec(routers=0)
    with pytest.raises(ValueError, match="65535"):
        ClusterSpec(port=65535, routers=2)


def test_both_routers_serve_and_share_the_workers(cluster) -> None:
    assert len(cluster.base_urls) == 2 and cluster.base_urls[0] != cluster.base_urls[1]
    for url in cluster.base_urls:
        _wait(lambda u=url: httpx.get(u + "/health").json()["ready"] == 2, 30)
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.post("/v1/completions", json=REQ).status_code == 200


def test_status_shows_the_pid_serving_a_request(cluster) -> None:
    pids = {w.name: w.proc.pid for w in cluster.workers}
    found: dict | None = None
    for _ in range(5):  # a request can finish before we look: then start another
        stream = LongStream(cluster.base_urls[1])  # through the second router
        assert stream.started.wait(60) and stream.id, "the stream did not start"
        while found is None and not stream.done.is_set():
            st = _status(cluster, cluster.base_urls[0])  # asked of the first router
            found = next((w for w in st["workers"] if stream.id in (w["requests"] or [])), None)
        stream.join()
        if found is not None:
            break
    assert found is not None, "the running request never showed in status"
    assert found["pid"] == pids[found["id"]] and found["host"]
    # Finished requests leave the list.
    _wait(lambda: not any(w["requests"] for w in _status(cluster, cluster.base_url)["workers"]), 30)
    text = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "status",
         "--router", cluster.base_url, "--admin-token", cluster.admin_token],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "REQS" in text and str(pids["worker-0"]) in text


def test_policy_set_through_one_router_reaches_every_router(cluster) -> None:
    """The rebalancing policy is the cluster's (kept in etcd), not one router's."""

    def policies() -> list[tuple[str, float | None]]:
        out = []
        for url in cluster.base_urls:
            rb = _status(cluster, url)["rebalancer"]
            out.append((rb["policy"], rb["params"].get("prefill_queue_high")))
        return out

    _cli(cluster, cluster.base_urls[1], "policy", "set", "queue", "--param",
         "prefill_queue_high=1234")  # fmt: skip
    _wait(lambda: policies() == [("queue", 1234)] * 2, 30)
    _cli(cluster, cluster.base_urls[0], "policy", "set", "static")
    _wait(lambda: [p for p, _ in policies()] == ["static"] * 2, 30)


def test_kill_9_of_the_leading_router(cluster) -> None:
    def leader_index() -> int | None:
        leads = [_status(cluster, u)["rebalancer"]["leader"] for u in cluster.base_urls]
        return leads.index(True) if leads.count(True) == 1 else None

    _wait(lambda: leader_index() is not None, 30)
    victim_i = leader_index()
    assert victim_i is not None
    victim, victim_url = cluster.routers[victim_i], cluster.base_urls[victim_i]
    survivor_url = cluster.base_urls[1 - victim_i]
    statuses: dict[str, list[int]] = {survivor_url: [], victim_url: []}
    stop = threading.Event()

    def traffic(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                try:
                    statuses[url].append(c.post("/v1/completions", json=REQ).status_code)
                except httpx.HTTPError:
                    statuses[url].append(-1)

    threads = [threading.Thread(target=traffic, args=(u,), daemon=True) for u in statuses]
    for t in threads:
        t.start()
    _wait(lambda: len(statuses[survivor_url]) >= 3 and len(statuses[victim_url]) >= 3, 60)
    victim.signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    killed_at = len(statuses[victim_url])
    # The survivor takes the leader key once the dead router's lease expires.
    _wait(lambda: _status(cluster, survivor_url)["rebalancer"]["leader"], 30)
    _wait(lambda: len(statuses[victim_url]) >= killed_at + 3, 30)
    n_survivor = len(statuses[survivor_url])
    _wait(lambda: len(statuses[survivor_url]) >= n_survivor + 3, 60)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert set(statuses[survivor_url]) == {200}, statuses[survivor_url]
    # Only connections to the dead router fail (the one in flight at the kill, then refusals).
    assert statuses[victim_url][killed_at:] and set(statuses[victim_url][killed_at + 1 :]) == {-1}
