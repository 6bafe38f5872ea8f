"""`epdserve up` with more than one worker runs the kvstore (and its mooncake_master) and a
cache-aware router; `epdserve status` shows the store; Ctrl-C stops all of it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from cluster_helpers import descendants, epdserve_up, process_parents, running

from services.cli.up import add_arguments, wants_kvstore
from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_kvstore_flag_defaults_to_more_than_one_worker() -> None:
    assert not wants_kvstore(parse(), 1)
    assert wants_kvstore(parse(), 2)
    assert wants_kvstore(parse("--kvstore"), 1)
    assert not wants_kvstore(parse("--no-kvstore"), 3)


@pytest.fixture(scope="module")
def up(tiny_model_dir, tmp_path_factory):
    """One `epdserve up --mixed 2` (so with the kvstore) for the tests below, in order."""
    model = str(tiny_model_dir("llama"))
    tmp = tmp_path_factory.mktemp("upkv")
    with epdserve_up(tmp, "--model", model, "--mixed", "2", "--cluster", "upkv") as (
        proc,
        base,
        env,
    ):
        yield proc, base, env, os.path.basename(model)


def complete(up, prompt: str) -> dict:
    _, base, _, name = up
    r = httpx.post(f"{base}/v1/completions", timeout=60,
                   json={"model": name, "prompt": prompt, "max_tokens": 2})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def status(env: dict) -> dict:
    st = subprocess.run([sys.executable, "-m", "services.cli.main", "status", "--json"],
                        capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert st.returncode == 0, st.stderr
    return json.loads(st.stdout)


def test_up_with_two_workers_runs_the_kvstore(up) -> None:
    proc, _, env, _ = up
    complete(up, "hi " * 40)
    status_ = status(env)
    assert len(status_["workers"]) == 2
    kv = status_["kvstore"]
    assert kv["present"] and kv["healthy"] and kv["master_alive"], kv
    text = subprocess.run([sys.executable, "-m", "services.cli.main", "status"],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert "kvstore kvstore-0 at 127.0.0.1:" in text.stdout, text.stdout
    assert "hit rate" in text.stdout and "master 127.0.0.1:" in text.stdout
    tree = descendants(proc.pid)
    assert len(tree) >= 6  # etcd, kvstore, mooncake_master, 2 workers, router


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def master_of(up_pid: int) -> tuple[int, int] | None:
    """The running mooncake_master under `up` and its metrics port."""
    for pid in descendants(up_pid):
        argv = cmdline(pid)
        if argv and argv[0].endswith("mooncake_master") and running(pid):
            port = next(a.split("=", 1)[1] for a in argv if a.startswith("--metrics_port="))
            return pid, int(port)
    return None


def master_metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5, trust_env=False).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def test_a_stopped_master_is_replaced_and_the_workers_use_the_new_one(up) -> None:
    """SIGSTOP of the kvstore's mooncake_master (its TCP ports still accept): the kvstore
    kills and restarts it, the kvstore itself keeps running, requests are served
    throughout, and the workers' store clients write into the new master."""
    proc, _, env, _ = up
    found = master_of(proc.pid)
    assert found is not None
    old, port = found
    kvstore_pid = process_parents()[old]
    # The workers' store clients connect lazily: write through until both have mounted.
    for i in range(40):
        complete(up, f"before {i} " * 30)
        m = master_metrics(port)
        if m.get("master_active_clients", 0) >= 2 and m.get("master_key_count", 0) > 0:
            break
    clients = master_metrics(port)["master_active_clients"]
    assert clients >= 1
    os.kill(old, signal.SIGSTOP)
    try:
        complete(up, "while stopped " * 30)  # served: the store is a cache
        deadline = time.monotonic() + 90
        while (found := master_of(proc.pid)) is None or found[0] == old:
            assert time.monotonic() < deadline, "the stopped master was never replaced"
            time.sleep(0.5)
        while not status(env)["kvstore"]["master_alive"]:
            assert time.monotonic() < deadline, "the new master never served"
            time.sleep(0.5)
        for i in range(200):
            complete(up, f"after {i} " * 30)
            m = master_metrics(port)
            if m.get("master_active_clients", 0) >= clients and m.get("master_key_count", 0) > 0:
                break
            assert time.monotonic() < deadline + 60, f"no worker wrote to the new master: {m}"
            time.sleep(0.5)
        assert process_parents()[found[0]] == kvstore_pid  # the same kvstore, not a new one
    finally:
        if running(old):
            os.kill(old, signal.SIGKILL)


def test_ctrl_c_stops_all_of_it(up) -> None:
    proc = up[0]
    tree = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=150) == 0  # bounded by the children's stop timeouts
    left = [p for p in tree if running(p)]
    assert not left, f"processes left running: {left}"
