"""The kvstore starts mooncake_master without running at-fork handlers in the child (gRPC's,
active in the kvstore, aborted 1 start in 10-30 with SIGABRT), and the master still ends
when its kvstore is killed outright."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cluster_helpers import running  # a zombie counts as gone (PID 1 here reaps none)

from services.kvstore.master import MasterPorts, MasterSupervisor

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's"),
]

ROOT = Path(__file__).resolve().parents[2]
_armed = False


def _exit_in_child() -> None:
    # Stands in for gRPC's at-fork handlers: a child that runs at-fork handlers dies here.
    if _armed:
        os._exit(86)


# NOTE: registered once for the whole test process; it does nothing unless a test arms it.
os.register_at_fork(after_in_child=_exit_in_child)


def test_the_master_starts_without_at_fork_handlers_in_the_child() -> None:
    global _armed
    ports = MasterPorts(host="127.0.0.1", rpc_port=1, metadata_port=1, metrics_port=1)
    sup = MasterSupervisor([sys.executable, "-S", "-c", "raise SystemExit(3)"], ports)

    async def start_once() -> int | None:
        assert not await sup._start_one()  # it exits at once: a failed start
        assert sup.proc is not None
        return await sup.proc.wait()

    _armed = True
    try:
        code = asyncio.run(start_once())
    finally:
        _armed = False
    # Before: 86, a Popen preexec_fn (PR_SET_PDEATHSIG) made Python fork() and run the
    # handlers in the child before its exec.
    assert code == 3


# A stand-in for the kvstore: starts a "master" as the supervisor does, says its pid, waits.
KVSTORE = textwrap.dedent("""
    import asyncio, sys, time
    from services.kvstore.master import spawn
    async def main():
        proc = await spawn([sys.executable, "-S", "-c", "import time; time.sleep(120)"])
        print(proc.pid, flush=True)
    asyncio.run(main())
    time.sleep(120)
""")


def test_the_master_ends_when_its_kvstore_is_killed() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", KVSTORE], stdout=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT)  # fmt: skip
    pid = 0
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert running(pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(pid), "the master outlived its kvstore"
    finally:
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
