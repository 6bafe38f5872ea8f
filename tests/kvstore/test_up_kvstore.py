"""`epdserve up` with more than one worker runs the kvstore (and its mooncake_master) and a
cache-aware router; `epdserve status` shows the store; Ctrl-C stops all of it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from cluster_helpers import descendants, epdserve_up, running

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


def test_up_with_two_workers_runs_the_kvstore(tiny_model_dir, tmp_path) -> None:
    model = str(tiny_model_dir("llama"))
    with epdserve_up(tmp_path, "--model", model, "--mixed", "2", "--cluster", "upkv") as (
        proc,
        base,
        env,
    ):
        r = httpx.post(f"{base}/v1/completions", timeout=60,
                       json={"model": os.path.basename(model), "prompt": "hi " * 40,
                             "max_tokens": 2})  # fmt: skip
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
