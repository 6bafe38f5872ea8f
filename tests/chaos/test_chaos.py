"""The chaos suite: a local PD cluster under steady streaming load while each process type
is killed (-9) or stopped (SIGSTOP) in turn, then restarted or continued.

Per fault it reports requests sent, failed, migrated and the longest stall a client saw
(printed, and written as JSON to ``$EPDSERVE_CHAOS_REPORT`` when set); for a worker fault
also "hit": the calls the worker ran when the signal landed (its own count: the fault waits
up to 10 s for one). "migrated" counts streams continued elsewhere after their first token.
A prefill worker's part of a request ends with that token (its Prefill call returns it once
the KV is pushed), so a prefill fault cuts only attempts before the first token, which the
router retries on another pair: the prefill rows migrate nothing by design, and their "hit"
is the number of prefills retried. A decode row may migrate fewer than it hit: the router
relays at its client's pace, and a worker that had sent all of a request's tokens leaves
nothing to migrate. Every answer is checked against the undisturbed greedy output of its
prompt, so a duplicated or missing token is a failure too. Targets: zero failed requests for worker faults and for etcd and
mooncake_master faults; a killed router replica loses only the requests it was serving; one
stopped fails none or fails them in the API's format. Every stop outlasts the cluster's etcd
lease (3 s), its etcd call timeout and the routers' load_stale_s. After the faults no worker
died and none holds a request or a KV reservation. Last, etcd, mooncake_master and a router
are each stopped past every lease and timeout on their path (OUTAGE_S): requests finish or
fail in the API's format (with mooncake_master every one finishes: the store is a cache), and
once the load pauses every KV block is free.

Run alone: ``.venv/bin/python -m pytest tests/chaos -s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import grpc
import httpx
import pytest

from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from tests.chaos.chaos_load import CLIENTS, PROMPTS, Load, body
from tests.cluster.cluster_helpers import load_report, start_cluster, worker_health

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow, pytest.mark.chaos]

ROUTER = {"load_stale_s": 2.0, "max_migrations": 3}
HUNG_FOR_S = 5.0  # how long a stopped process stays stopped
# Shortened so that an outage of OUTAGE_S outlasts them; the defaults are 30 s and 300 s.
WORKER = {"reserve_timeout_s": 10.0, "kv_transfer_timeout_s": 10.0, "kv_write_grace_s": 2.0,
          "kv_fence_timeout_s": 10.0}  # fmt: skip
# A dependency stopped this long outlives every lease and timeout on its path: the etcd
# leases (3 s), load_stale_s, the KV reservation and push deadlines (WORKER), Mooncake's
# object lease (5 s) and gRPC keepalive (10 s ping + 5 s answer, services/common/grpc_utils).
OUTAGE_S = 16.0


def migrations(urls: list[str]) -> dict[str, float]:
    """Requests each live router migrated so far."""
    out: dict[str, float] = {}
    for url in urls:
        try:
            text = httpx.get(url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            continue  # a router just killed
        out[url] = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("epdserve:router_migrations_total{")
        )
    return out


def migrated_since(before: dict[str, float], after: dict[str, float]) -> int:
    """Migrations between two snapshots, by the routers alive at the second one."""
    return int(sum(n - before.get(url, 0.0) for url, n in after.items()))


def child_pids(pid: int, name: str) -> list[int]:
    """Live children of ``pid`` whose command line contains ``name``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if ppid == pid and name in cmdline:
                out.append(int(entry.name))
    return out


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    c = start_cluster(
        tiny_model_dir("llama"), workers=0, prefill=2, decode=2, routers=2, kvstore=True,
        router_overrides=ROUTER, worker_overrides=WORKER,
    )  # fmt: skip
    yield c
    c.stop()


@pytest.fixture(scope="module")
def load(cluster):
    expected = {}
    with httpx.Client(timeout=60) as c:
        for p in PROMPTS:
            r = c.post(cluster.base_url + "/v1/completions", json={**body(p), "stream": False})
            assert r.status_code == 200, r.text
            expected[p] = r.json()["choices"][0]["text"]
    lo = Load(list(cluster.base_urls), expected)
    lo.start()
    lo.completed_after(0.0, 6, 60)
    yield lo
    lo.stop()


REPORT: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    lines = [f"{'fault':<28}{'sent':>6}{'failed':>8}{'hit':>5}{'migrated':>10}{'max stall s':>13}"]
    for r in REPORT:
        hit = "-" if r["hit"] is None else r["hit"]
        lines.append(
            f"{r['fault']:<28}{r['sent']:>6}{r['failed']:>8}{hit:>5}{r['migrated']:>10}"
            f"{r['max_stall_s']:>13.2f}"
        )
    print("\nchaos report\n" + "\n".join(lines))
    if os.environ.get("EPDSERVE_CHAOS_REPORT"):
        Path(os.environ["EPDSERVE_CHAOS_REPORT"]).write_text(json.dumps(REPORT, indent=2))


def run_fault(cluster, load: Load, name: str, inject, recover, lost_router: str = "") -> dict:
    """Inject a fault under load, recover, wait until the cluster serves again; record and
    return the outcome of every request that started from just before the fault on.
    ``inject`` may return what it hit (``signal_when_busy``)."""
    begin = time.monotonic() - 1.0  # requests already running when the fault lands count
    before = migrations(load.urls)
    hit = inject()
    recover()
    load.completed_after(time.monotonic(), 2 * CLIENTS, 120)
    outcomes = load.since(begin)
    failed = [o for o in outcomes if not o.ok and o.router != lost_router]
    lost = [o for o in outcomes if not o.ok and o.router == lost_router]
    row = {
        "fault": name, "sent": len(outcomes), "failed": len(failed), "lost_with_router": len(lost),
        "hit": hit if isinstance(hit, int) else None,
        "unclean": len([o for o in failed if not o.clean]),
        "migrated": migrated_since(before, migrations(load.urls)),
        "max_stall_s": max((o.stall_s for o in outcomes), default=0.0),
        "errors": sorted({f"{o.router} +{o.started - begin:.1f}s {o.error}" for o in failed})[:5],
    }  # fmt: skip
    REPORT.append(row)
    return row


def worker_of(cluster, role: str):
    """A live worker of ``role``, preferably one a router is running requests on now."""
    live = [w for w in cluster.workers if w.alive() and role_of(cluster, w.name) == role]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for url in cluster.base_urls:
            workers = worker_health(url, cluster.admin_token)[1]["workers"]
            busy = [w for w in live if workers.get(w.name, {}).get("inflight")]
            if busy:
                return busy[0]
        time.sleep(0.02)
    return live[0]


def signal_when_busy(proc, sig: int) -> int:
    """Send ``sig`` to the worker ``proc`` once it runs a call (or after 10 s); the calls it
    ran then, by its own count (a router's count also holds streams it is still relaying
    after the worker finished them)."""
    address = proc.ready_field("address")
    deadline = time.monotonic() + 10
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as ch:
        stub = pb_grpc.WorkerServiceStub(ch)
        while True:
            n = stub.Health(pb.HealthRequest(), timeout=10).num_inflight
            if n or time.monotonic() > deadline:
                proc.signal(sig)
                return n
            time.sleep(0.005)


def role_of(cluster, name: str) -> str | None:
    workers = worker_health(cluster.base_url, cluster.admin_token)[1]["workers"]
    return workers.get(name, {}).get("role")


def wait_ready(proc) -> None:
    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(proc.describe_failure())
        return proc.ready.is_set()

    wait_for(ready, 300, f"{proc.name} ready")


def replace_worker(cluster, victim, role: str) -> None:
    victim.proc.wait(timeout=30)
    fresh = cluster.start_worker(role)
    wait_ready(fresh)
    wait_for(lambda: role_of(cluster, fresh.name) == role, 30, f"{fresh.name} routed")


def stop_then_continue(proc) -> None:
    time.sleep(HUNG_FOR_S)
    proc.signal(signal.SIGCONT)


KILLED: set[str] = set()  # the workers killed on purpose (test_kill_worker)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_kill_worker(cluster, load, role):
    victim = worker_of(cluster, role)
    KILLED.add(victim.name)
    row = run_fault(
        cluster, load, f"kill -9 {role}", lambda: signal_when_busy(victim, signal.SIGKILL),
        lambda: replace_worker(cluster, victim, role),
    )  # fmt: skip
    assert row["failed"] == 0, row["errors"]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_stop_worker(cluster, load, role):
    victim = worker_of(cluster, role)
    row = run_fault(
        cluster, load, f"SIGSTOP {role}", lambda: signal_when_busy(victim, signal.SIGSTOP),
        lambda: stop_then_continue(victim),
    )  # fmt: skip
    assert row["failed"] == 0, row["errors"]
    wait_for(
        lambda: worker_health(cluster.base_url, cluster.admin_token)[1]["workers"][victim.name][
            "reachable"
        ],
        30,
        "the continued worker is routed again",
    )


def test_kill_etcd(cluster, load):
    def recover() -> None:
        time.sleep(2.0)
        cluster.etcd.start()

    row = run_fault(cluster, load, "kill -9 etcd", lambda: cluster.etcd.stop(kill=True), recover)
    assert row["failed"] == 0, row["errors"]


def test_stop_etcd(cluster, load):
    proc = cluster.etcd.proc
    row = run_fault(
        cluster, load, "SIGSTOP etcd", lambda: os.kill(proc.pid, signal.SIGSTOP),
        lambda: (time.sleep(HUNG_FOR_S), os.kill(proc.pid, signal.SIGCONT)),
    )  # fmt: skip
    assert row["failed"] == 0, row["errors"]


def master_pid(cluster) -> int:
    """The pid of the kvstore's mooncake_master (waits while it is being restarted)."""
    found: list[int] = []

    def one() -> bool:
        found[:] = child_pids(cluster.kvstore.proc.pid, "mooncake_master")
        return len(found) == 1

    wait_for(one, 60, "one mooncake_master under the kvstore")
    return found[0]


def test_kill_mooncake_master(cluster, load):
    old = master_pid(cluster)

    def restarted() -> None:
        wait_for(lambda: master_pid(cluster) != old, 60, "the kvstore restarts mooncake_master")

    row = run_fault(
        cluster, load, "kill -9 mooncake_master", lambda: os.kill(old, signal.SIGKILL), restarted
    )
    assert row["failed"] == 0, row["errors"]


def test_stop_mooncake_master(cluster, load):
    pid = master_pid(cluster)
    row = run_fault(
        cluster, load, "SIGSTOP mooncake_master", lambda: os.kill(pid, signal.SIGSTOP),
        lambda: (time.sleep(HUNG_FOR_S), os.kill(pid, signal.SIGCONT)),
    )  # fmt: skip
    assert row["failed"] == 0, row["errors"]


def test_kill_router_replica(cluster, load):
    victim = cluster.routers[-1]
    url = cluster.base_urls[-1]

    def kill() -> None:
        # No new request goes to the replica from here on (a Service that stops routing to
        # it); the ones it is serving die with it. NOTE: removed after the kill (in recover),
        # a client that finished a request on the other replica before this thread ran again
        # sent one more to the dead address: 4 lost with 3 clients at load 25.
        load.urls.remove(url)
        victim.signal(signal.SIGKILL)

    def recover() -> None:
        victim.proc.wait(timeout=30)
        fresh = cluster.start_router()
        wait_ready(fresh)
        fresh_url = fresh.ready_field("url")
        # Like a Service behind a readiness probe: clients come once /health says ready (the
        # ready line only says it listens; it may not have listed the workers yet).
        cluster.wait_healthy(timeout=60, router=fresh, url=fresh_url)
        cluster.base_urls.append(fresh_url)
        load.urls.append(fresh_url)

    row = run_fault(
        cluster, load, "kill -9 router replica", kill, recover, lost_router=url,
    )  # fmt: skip
    # Only the requests the dead replica was serving are lost (at most one per client).
    assert row["failed"] == 0, row["errors"]
    assert row["lost_with_router"] <= CLIENTS, row


def test_stop_router_replica(cluster, load):
    victim = cluster.routers[0]
    begin = time.monotonic() - 1.0  # as run_fault counts
    row = run_fault(
        cluster, load, "SIGSTOP router replica", lambda: victim.signal(signal.SIGSTOP),
        lambda: stop_then_continue(victim),
    )  # fmt: skip
    unclean = [o.error for o in load.since(begin) if not (o.ok or o.clean)]
    assert not unclean, unclean[:5]
    assert row["failed"] == 0, row["errors"]


def held_blocks(cluster) -> dict[str, int]:
    """KV blocks in use on each live worker (running requests, reservations)."""
    out = {}
    for w in cluster.workers:
        if w.alive():
            r = load_report(w.ready_field("address"))
            out[w.name] = r.num_total_blocks - r.num_free_blocks
    return out


def serving_again(load: Load, since: float) -> bool:
    """The last 2 * CLIENTS requests started after ``since`` all succeeded."""
    tail = load.since(since)[-2 * CLIENTS :]
    return len(tail) == 2 * CLIENTS and all(o.ok for o in tail)


@pytest.mark.parametrize("what", ["etcd", "mooncake_master", "router"])
def test_dependency_stopped_past_every_timeout(cluster, load, what):
    """A dependency SIGSTOPped for longer than every lease and timeout, then continued:
    requests fail in the API's format or finish (none hangs), the cluster serves again with
    no restart by hand, no worker dies and every KV block is free once the load stops."""
    pid = {"etcd": lambda: cluster.etcd.proc.pid, "mooncake_master": lambda: master_pid(cluster),
           "router": lambda: cluster.routers[0].proc.pid}[what]()  # fmt: skip
    workers = {w.name: w.proc.pid for w in cluster.workers if w.alive()}

    def resume() -> None:
        time.sleep(OUTAGE_S)
        # NOTE: the kvstore may have replaced a mooncake_master that stopped answering.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    row = run_fault(cluster, load, f"SIGSTOP {what} {OUTAGE_S:.0f} s",
                    lambda: os.kill(pid, signal.SIGSTOP), resume)  # fmt: skip
    assert row["unclean"] == 0, (row["errors"], f"stopped: {pid}, routers: {load.urls}")
    if what == "mooncake_master":
        # The store is a cache: a master that does not answer costs the workers its hits
        # and nothing else, so every request finishes with the undisturbed text.
        assert row["failed"] == 0, row["errors"]
    resumed = time.monotonic() - 1.0
    wait_for(lambda: serving_again(load, resumed), 120, f"serving after {what} continued")
    assert {w.name: w.proc.pid for w in cluster.workers if w.alive()} == workers
    load.stop()
    try:
        wait_for(lambda: not any(held_blocks(cluster).values()), 60, "every KV block free")
    finally:
        load.start()


def test_nothing_leaked_and_no_worker_died(cluster, load):
    """Last: with the load stopped, every worker is alive and holds no request and no KV
    reservation (a request that failed in a fault freed its blocks)."""
    load.stop()
    died = [w.describe_failure() for w in cluster.workers if not w.alive() and w.name not in KILLED]
    assert not died, died

    def idle() -> bool:
        rows = status(cluster)["workers"]
        return bool(rows) and all(
            w["state"] == "serving" and w["requests"] == [] and w["reserved"] == []
            and w["running"] == 0 and w["waiting"] == 0
            for w in rows
        )  # fmt: skip

    wait_for(idle, 60, "every worker serving, holding no request or KV reservation")


def status(cluster) -> dict:
    r = httpx.get(cluster.base_url + "/admin/status", timeout=30,
                  headers={"Authorization": f"Bearer {cluster.admin_token}"})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()
