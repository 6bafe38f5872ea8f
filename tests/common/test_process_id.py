"""A process's identity on its machine (services/common/process_id.py): another process of the
same boot and pid namespace tells whether it still runs; elsewhere it cannot, and says so."""

from __future__ import annotations

import os
import subprocess
import sys

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
