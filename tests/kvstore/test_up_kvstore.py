"""`epdserve up` with more than one worker runs the kvstore (and its mooncake_master) and a
cache-aware router; `epdserve status` shows the store; Ctrl-C stops all of it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from services.cli.up import add_arguments, wants_kvstore
from services.common.net import free_port

pytest.importorskip("mooncake.engine")
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


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (the master is the kvstore's child)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_up_with_two_workers_runs_the_kvstore(tiny_model_dir, tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "EPDSERVE_CONFIG_DIR": str(tmp_path / "cfg")}
    env.pop("EPDSERVE_ROUTER", None)
    env.pop("EPDSERVE_ADMIN_TOKEN", None)
    # stderr to a file: a pipe nobody reads could fill and block `up`.
    err = open(tmp_path / "up.err", "w")  # noqa: SIM115 - closed in the finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--model", str(tiny_model_dir("llama")),
         "--mixed", "2", "--port", str(port), "--cluster", "upkv"],
        stdout=subprocess.PIPE, stderr=err, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the cluster is ready (or up failed)
        assert f"http://127.0.0.1:{port}/v1" in line, line + (tmp_path / "up.err").read_text()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": os.path.basename(str(tiny_model_dir("llama"))),
                             "prompt": "hi " * 40, "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200, r.text
        st = subprocess.run([sys.executable, "-m", "services.cli.main", "status", "--json"],
                            capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        assert len(status["workers"]) == 2
        kv = status["kvstore"]
        assert kv["present"] and kv["healthy"] and kv["master_alive"], kv
        text = subprocess.run([sys.executable, "-m", "services.cli.main", "status"],
                              capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
        assert "kvstore kvstore-0 at 127.0.0.1:" in text.stdout, text.stdout
        assert "hit rate" in text.stdout and "master 127.0.0.1:" in text.stdout
        tree = descendants(proc.pid)
        assert len(tree) >= 6  # etcd, kvstore, mooncake_master, 2 workers, router
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=150) == 0  # bounded by the children's stop timeouts
        left = [p for p in tree if running(p)]
        assert not left, f"processes left running: {left}"
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):  # do not leave a cluster running for later tests
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
        err.close()
