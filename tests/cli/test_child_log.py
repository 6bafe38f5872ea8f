"""A child of `epdserve up` writes its output to a file `up` follows, not to a pipe: a
stopped `up` (Ctrl-Z, SIGSTOP) must not block its children's log writes. Real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from services.cli import child_log
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


def _disk_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_the_file_is_freed_once_read_past_its_bound() -> None:
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
        assert _disk_bytes(log.fd) <= 8192 + 10 * 1100 + 8192  # freed, not 60 KB
    finally:
        log.close()


def test_a_child_that_never_pauses_loses_no_line_and_its_file_stays_bounded() -> None:
    # Before: the reader emptied the file only when a read found nothing new, so a child
    # that never paused grew it without bound, and a line written between that read and the
    # truncation was lost (/tmp/chaos8/race.py: 6-14 % of 200,000 lines at 64 KiB).
    log = ChildLog(max_bytes=1 << 16)
    script = "import sys\nfor i in range(20000): sys.stdout.write(f'{i} {\"z\" * 100}\\n')\n"
    got: list[int] = []
    try:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=log.fd)
        log.follow(proc, lambda line: got.append(int(line.split()[0])))
        assert got == list(range(20000))
        assert _disk_bytes(log.fd) <= 2 * (1 << 16) + (1 << 16)  # not its 2 MB
    finally:
        log.close()


def test_a_line_written_while_the_reader_frees_the_file_is_kept(monkeypatch) -> None:
    """The child writes in the instant after a read found nothing new (the reader is past its
    bound): the old reader emptied the file there and lost that line."""
    log = ChildLog(max_bytes=4096)
    real_pread, injected = os.pread, []

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        if not data and offset >= 4096 and not injected:
            injected.append(os.write(fd, b"written in the gap\n"))  # as the child would
        return data

    monkeypatch.setattr(child_log.os, "pread", pread)
    script = "import time\nfor i in range(50): print('x' * 100, flush=True)\ntime.sleep(1)\n"
    got: list[str] = []
    try:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=log.fd)
        log.follow(proc, got.append)
        assert injected and got[-1] == "written in the gap" and len(got) == 51
    finally:
        log.close()


def test_a_line_without_end_is_passed_on_in_pieces(monkeypatch) -> None:
    """A progress bar (\\r, never \\n) is not held whole in `up`'s memory."""
    monkeypatch.setattr(child_log, "MAX_LINE", 1 << 16, raising=False)
    log = ChildLog()
    script = "import sys\nfor i in range(6000): sys.stdout.write(f'\\r{i:050d}')\n"
    got: list[str] = []
    try:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=log.fd)
        log.follow(proc, got.append)
        assert "".join(got) == "".join(f"\r{i:050d}" for i in range(6000))
        assert max(map(len, got)) <= (1 << 16) + child_log.CHUNK
    finally:
        log.close()
