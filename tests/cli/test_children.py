"""What `epdserve up`'s supervisor restarts: a ManagedProcess (same command, new process,
ready again) and the etcd adapter (same ports and data). Real, small processes."""

from __future__ import annotations

import os
import signal
import sys
import time

from services.cli.children import EtcdChild, ManagedProcess
from services.cli.supervisor import RestartPolicy, Supervisor
from services.common.etcd_server import EtcdServer
from services.common.net import free_port


def wait(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_managed_process_restarts_the_same_command() -> None:
    script = "import os, time; print('READY pid=%d' % os.getpid(), flush=True); time.sleep(60)"
    p = ManagedProcess("worker-7", [sys.executable, "-c", script], "READY", role="decode")
    try:
        assert p.label == "worker-7 (decode)"
        assert p.ready.wait(20) and p.is_ready()
        first = p.proc.pid
        assert p.ready_field("pid") == str(first)
        p.signal(signal.SIGKILL)
        wait(lambda: not p.alive())
        assert p.returncode() == -9
        p.restart()
        assert p.ready.wait(20) and p.alive()
        assert p.proc.pid != first and p.ready_field("pid") == str(p.proc.pid)
        assert p.last_output().splitlines() == [
            f"READY pid={first}", f"[epdserve: worker-7 restarted as pid {p.proc.pid}]",
            f"READY pid={p.proc.pid}",
        ]  # fmt: skip
    finally:
        p.stop(timeout=5)


def test_etcd_child_restarts_on_the_same_port_with_its_data(tmp_path) -> None:
    etcd = EtcdServer(data_dir=str(tmp_path))
    etcd.start()
    child = EtcdChild(etcd)
    try:
        etcd.etcdctl("put", "/epdserve/t/k", "v")
        endpoint = etcd.endpoint
        assert child.alive() and child.is_ready()
        assert etcd.proc is not None
        etcd.proc.kill()
        wait(lambda: not child.alive())
        assert child.returncode() == -9
        child.restart()
        assert child.alive() and etcd.endpoint == endpoint
        assert etcd.etcdctl("get", "/epdserve/t/k", "--print-value-only").strip() == "v"
    finally:
        etcd.cleanup()


def test_a_process_that_restarts_in_place_is_known_by_its_latest_ready_line(tmp_path) -> None:
    """A worker that loads another model execs itself (same pid) and says it is ready again
    with new ports: the first line's metrics port was kept (stale)."""
    # argv: N, the script itself and a file: the first run execs the script again with N=2
    # once the file exists (the supervisor has seen its first line).
    go = tmp_path / "go"
    script = ("import os, sys, time; n, me, go = sys.argv[1:]; print(f'READY port={n}', flush=True)\n"
              "while n == '1' and not os.path.exists(go):\n    time.sleep(0.02)\n"
              "if n == '1':\n    os.execv(sys.executable, [sys.executable, '-c', me, '2', me, go])\n"
              "time.sleep(60)")  # fmt: skip
    p = ManagedProcess("worker-3", [sys.executable, "-c", script, "1", script, str(go)], "READY")
    said: list[str] = []
    try:
        assert p.ready.wait(20)
        supervisor = Supervisor([p], RestartPolicy(), said.append)
        assert supervisor.poll() is None and said == []
        go.touch()
        wait(lambda: supervisor.poll() is None and p.ready_field("port") == "2")
        assert p.alive() and said == ["worker-3 restarted in place: READY port=2"]
    finally:
        p.stop(timeout=5)


def test_a_routers_liveness_probe_never_goes_through_a_proxy(monkeypatch) -> None:
    """`up` probes its routers on this machine: a proxy named in http_proxy (here one that
    refuses connections) is not asked (urllib asked it even for 127.0.0.1, every probe failed
    and the router was killed every 30 s). Any HTTP answer passes (a 404 too)."""
    script = ("import http.server as h; s = h.HTTPServer(('127.0.0.1', 0), h.BaseHTTPRequestHandler)\n"
              "print(f'READY url=http://127.0.0.1:{s.server_port}', flush=True); s.serve_forever()")  # fmt: skip
    p = ManagedProcess("router", [sys.executable, "-c", script], "READY", probe_path="/health")
    try:
        assert p.ready.wait(20)
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
        assert p.probe(timeout=5) is True
    finally:
        p.stop(timeout=5)


def test_a_signal_to_a_process_reaped_meanwhile_is_a_no_op() -> None:
    """`up`'s stop signals each child, and the child's log thread polls it meanwhile: a poll
    that finds the wait lock taken answers "running" though the process was just reaped. The
    signal then raised ProcessLookupError (a CI teardown error, session 20) out of the stop,
    leaving the other children running."""
    script = "import time; print('READY', flush=True); time.sleep(60)"
    p = ManagedProcess("worker-8", [sys.executable, "-c", script], "READY")
    assert p.ready.wait(20)
    with p.proc._waitpid_lock:  # another thread is inside poll() (the log thread) ...
        os.kill(p.proc.pid, signal.SIGKILL)
        os.waitpid(p.proc.pid, 0)  # ... and reaps the process there
        assert p.alive()  # what poll() answers meanwhile
        p.signal(signal.SIGTERM)
        p.kill()
    wait(lambda: not p.alive())
    p.stop(timeout=5)
