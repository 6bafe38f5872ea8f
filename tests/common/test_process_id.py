"""A process's identity on its machine (services/common/process_id.py): another process of the
same boot and pid namespace tells whether it still runs; elsewhere it cannot, and says so."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from services.common import process_id


def test_a_killed_process_is_gone_and_a_running_one_is_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ident = process_id.identity(child.pid)
        assert ident and process_id.identity() != ident
        assert process_id.gone(ident) is False and process_id.gone(process_id.identity()) is False
        child.kill()
        child.wait(timeout=10)
        assert process_id.gone(ident) is True
    finally:
        child.kill()


def test_a_reused_pid_or_another_machine_is_told_apart() -> None:
    boot, ns, pid, start = process_id.identity().split("/")
    assert int(pid) == os.getpid()
    assert process_id.gone(f"{boot}/{ns}/{pid}/{int(start) + 1}") is True  # a new process
    assert process_id.gone(f"other-boot/{ns}/{pid}/{start}") is None  # not checkable here
    assert process_id.gone(f"{boot}/pid:[1]/{pid}/{start}") is None  # another container
    assert process_id.gone("") is None and process_id.gone("a/b") is None


def test_a_process_whose_proc_entry_is_hidden_is_not_taken_for_gone(monkeypatch) -> None:
    """Another user's process under a /proc mounted with hidepid (systemd's ProtectProc=,
    hardened hosts): its /proc/<pid> is unreadable or invisible, which read as "exited", and
    a router took every starting worker on its machine for dead (a 503 instead of a wait).
    The kernel still tells whether the pid runs (kill 0: EPERM); then it cannot be checked."""
    ident = process_id.identity()
    read = process_id._read
    monkeypatch.setattr(process_id, "_read",  # /proc/<pid> hidden
                        lambda path: "" if path.endswith("/stat") else read(path))  # fmt: skip

    def kill(pid: int, sig: int) -> None:
        assert sig == 0
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(process_id.os, "kill", kill)
    assert process_id.gone(ident) is None

    def kill_gone(pid: int, sig: int) -> None:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(process_id.os, "kill", kill_gone)
    assert process_id.gone(ident) is True


def test_a_zombie_of_another_user_is_gone(monkeypatch) -> None:
    """Exited, not yet reaped by its parent: its /proc/<pid>/stat says so (state Z) even where
    the kernel refuses to signal it (another user's)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ident = process_id.identity(child.pid)
        child.kill()
        deadline = time.monotonic() + 10
        while process_id._start_ticks(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # the signal's delivery; nobody reaps it

        def kill(pid: int, sig: int) -> None:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(process_id.os, "kill", kill)
        assert process_id.gone(ident) is True
    finally:
        monkeypatch.undo()
        child.kill()
        child.wait(timeout=10)
