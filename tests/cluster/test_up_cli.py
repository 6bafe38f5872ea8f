"""`epdserve up` as a user runs it: starts, prints the URL, answers, stops everything on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from cluster_helpers import children, epdserve_up, running

# Real processes: a few tens of seconds per module on 2 CPU cores.
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def test_up_refuses_half_a_pd_cluster_clearly() -> None:
    r = subprocess.run([sys.executable, "-m", "services.cli.main", "up", "--prefill", "1"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "needs both --prefill N and --decode N" in r.stderr


def test_up_refuses_a_bad_restart_policy_clearly() -> None:
    r = subprocess.run([sys.executable, "-m", "services.cli.main", "up", "--max-restarts", "-1"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--max-restarts must be >= 0" in r.stderr


def test_up_serves_and_stops_on_ctrl_c(tiny_model_dir, tmp_path) -> None:
    model = str(tiny_model_dir("llama"))
    # EPDSERVE_CONFIG_DIR (tmp_path/cfg): where `epdserve up` leaves the router URL and admin
    # token for the operator CLI.
    with epdserve_up(tmp_path, "--model", model, "--cluster", "uptest") as (proc, base, env):
        r = httpx.post(f"{base}/v1/completions", timeout=60,
                       json={"model": os.path.basename(model), "prompt": "hi",
                             "max_tokens": 3})  # fmt: skip
        assert r.status_code == 200, r.text
        token_file = tmp_path / "cfg" / "admin-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        st = subprocess.run([sys.executable, "-m", "services.cli.main", "status", "--json"],
                            capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
        assert st.returncode == 0, st.stderr
        assert [w["role"] for w in json.loads(st.stdout)["workers"]] == ["mixed"]
        kids = children(proc.pid)
        assert len(kids) >= 3  # etcd, worker, router
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=150) == 0  # the children drain: up to 15 s + 30 s each, bounded
        time.sleep(0.5)
        assert not [pid for pid in kids if running(pid)], "children left running"
        assert not token_file.exists()  # the CLI no longer points at a stopped cluster
