"""`epdserve up` killed outright (kill -9) takes its children with it: the processes it starts
(ManagedProcess: workers, routers, the kvstore; EtcdServer: etcd) get SIGTERM when it dies,
instead of running on as orphans that hold their ports and memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from services.common.parent_death import with_parent_death

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for `up`: starts a ManagedProcess and an etcd the way the launcher does, says
# their pids, and waits to be killed.
PARENT = textwrap.dedent("""
    import sys, time
    from services.cli.children import ManagedProcess
    from services.common.etcd_server import EtcdServer
    child = ManagedProcess("child", [sys.executable, "-c",
        "import time; print('CHILD_READY', flush=True); time.sleep(120)"], "CHILD_READY")
    etcd = EtcdServer()
    etcd.start()
    assert child.ready.wait(30)
    print(child.proc.pid, etcd.proc.pid, flush=True)
    time.sleep(120)
""")


def _running(pid: int) -> bool:
    """Alive and not a zombie (PID 1 here does not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_end_when_up_is_killed() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT)  # fmt: skip
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_running(p) for p in pids)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Before: both ran on (the child for its 120 s, etcd for ever).
        assert not [p for p in pids if _running(p)]
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def test_only_the_main_thread_asks_for_it() -> None:
    # The kernel signals when the forking *thread* ends: a child forked from a short-lived
    # thread would be stopped as soon as that thread returned.
    argv = ["true"]
    assert with_parent_death(argv) != argv or not sys.platform.startswith("linux")
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(with_parent_death(argv)))
    t.start()
    t.join()
    assert got == [argv]


def test_the_wrapped_command_runs_as_itself() -> None:
    out = subprocess.run(with_parent_death([sys.executable, "-c", "import sys; print(sys.argv)",
                                            "a b", "--c"]),
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "['-c', 'a b', '--c']"


def test_children_start_after_grpc_ran_in_the_parent() -> None:
    # `up` speaks gRPC (liveness probes) before it restarts a child: a preexec_fn made Python
    # fork() with gRPC's at-fork handlers, which aborted the child (SIGABRT) before its exec.
    import grpc

    from services.cli.children import ManagedProcess

    with grpc.insecure_channel("127.0.0.1:1") as ch:
        with contextlib.suppress(grpc.FutureTimeoutError):
            grpc.channel_ready_future(ch).result(timeout=0.2)
        p = ManagedProcess("c", [sys.executable, "-c", "print('UP', flush=True)"], "UP")
        assert p.ready.wait(30)
        assert p.proc.wait(30) == 0
