"""`epdserve up` on a port something else holds says so at once, in one line, before it
starts anything (before: etcd and the workers started, the model loaded, and then the
router's uvicorn traceback ended `up` with "router exited with 3")."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def test_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EPDSERVE_CONFIG_DIR": str(tmp_path)}
        r = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "up", "--port", str(port)],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=50,
        )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"port {port} on 127.0.0.1 is in use" in r.stderr
    assert "Traceback" not in r.stderr and "starting etcd" not in r.stderr


def test_ports_in_use_checks_every_router() -> None:
    from services.cli.up import ports_in_use

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert ports_in_use("127.0.0.1", port, 1) == [port]
        assert port in ports_in_use("127.0.0.1", port - 1, 2)  # the second router's port
    assert ports_in_use("127.0.0.1", 0, 3) == []  # free ports are picked
