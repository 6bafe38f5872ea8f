"""A child of `epdserve up` writes its output to a file `up` follows, not to a pipe: a
stopped `up` (Ctrl-Z, SIGSTOP) must not block its children's log writes. Real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from services.cli.child_log import ChildLog
from services.cli.children import ManagedProcess

# 2 MiB of output: 32 times a pipe's default buffer.
NOISY = (
    "import sys\n"
    "print('READY pid=1', flush=True)\n"
    "for i in range(2048): sys.stdout.write(str(i) + ' ' + 'x' * 1020 + '\\n')\n"
    "sys.stdout.write('last line, no newline')\n"
)


def test_a_child_is_not_blocked_while_up_reads_nothing(monkeypatch) -> None:
    gate = threading.Event()  # `up` stopped: its reader thread reads nothing until set

    def stalled(self, *args) -> None:
        gate.wait(60)

    monkeypatch.setattr(ManagedProcess, "_read", stalled)
    p = ManagedProcess("worker-9", [sys.executable, "-c", NOISY], "READY")
    try:
        # On a pipe the child blocks at its 64th KiB and never exits.
        assert p.proc.wait(timeout=30) == 0
    finally:
        gate.set()
        p.stop(timeout=5)


def test_up_reads_every_line_once_it_runs_again() -> None:
    p = ManagedProcess("worker-9", [sys.executable, "-c", NOISY], "READY")
    try:
        assert p.proc.wait(timeout=30) == 0
        p._reader.join(timeout=10)
        assert not p._reader.is_alive()
        assert p.ready_line == "READY pid=1"
        lines = list(p.tail)
        assert lines[-1] == "last line, no newline"
        assert [int(line.split()[0]) for line in lines[:-1]] == list(range(2048 - 199, 2048))
    finally:
        p.stop(timeout=5)


def test_the_file_is_emptied_once_read_past_its_bound() -> None:
    log = ChildLog(max_bytes=8192)
    script = (
        "import time\n"
        "for burst in range(6):\n"
        "    for i in range(10): print(burst * 10 + i, 'y' * 1000, flush=True)\n"
        "    time.sleep(0.5)\n"
    )
    got: list[int] = []
    try:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=log.fd)
        log.follow(proc, lambda line: got.append(int(line.split()[0])))
        assert got == list(range(60))  # nothing lost: the reader kept up between bursts
        assert os.fstat(log.fd).st_size <= 8192 + 10 * 1100  # emptied, not 60 KB
    finally:
        log.close()
