"""benchmarks/serving_sweep.py starts its `epdserve up` runs with a configuration folder of
their own: the admin token and router URL `up` writes must not replace the user's (those of
the user's own cluster, in ~/.config/epdserve)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from benchmarks import serving_sweep

# What `epdserve up` does with its configuration folder, without the cluster.
WRITE_TOKEN = (
    "from services.cli.admin_config import config_dir, write_private\n"
    "write_private(config_dir() / 'admin-token', 'bench-token')\n"
)


class Stop(Exception):
    pass


def test_run_one_keeps_up_out_of_the_users_config_folder(tmp_path, monkeypatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("EPDSERVE_CONFIG_DIR", raising=False)
    started: list[subprocess.Popen] = []
    popen = subprocess.Popen

    def fake_up(cmd, **kw):  # the same env and folder, the token writer instead of `up`
        assert cmd[1:4] == ["-m", "services.cli.main", "up"], cmd
        started.append(popen([sys.executable, "-c", WRITE_TOKEN], **kw))
        return started[-1]

    def ready(port: int) -> None:
        assert started[-1].wait(60) == 0
        raise Stop  # no server to benchmark

    monkeypatch.setattr(serving_sweep.subprocess, "Popen", fake_up)
    monkeypatch.setattr(serving_sweep, "ready", ready)
    monkeypatch.setattr(serving_sweep, "stop_up", lambda proc: None)
    with pytest.raises(Stop):
        serving_sweep.run_one(argparse.Namespace(num_prompts=1), [], {})
    assert len(started) == 1
    assert not (home / ".config" / "epdserve").exists()
