"""Where a child of `epdserve up` writes its output: an unlinked file, never a pipe.

With a pipe, a stopped `up` (Ctrl-Z, SIGSTOP) stops reading, the pipe fills after 64 KiB,
and the next log line blocks the child: a router's event loop, a worker's step. A file
never blocks its writer; `up` follows it when it runs and catches up after a stop.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import subprocess
import tempfile
import time
from collections.abc import Callable

# NOTE: each time the reader has read this many more bytes it frees the disk blocks of what it
# read (a hole punched in the file: offsets and size stay, so nothing the child writes at the
# same moment can be lost); where the file system cannot punch holes, it empties the file
# once it has read all of it instead, and a line written in that instant is lost.
MAX_FILE_BYTES = 64 << 20
CHUNK = 1 << 16
IDLE_SLEEP_S = (0.01, 0.2)  # the poll backs off from the first to the second when idle
MAX_LINE = 1 << 20  # a longer line (a progress bar's \r, no \n) is passed on in pieces
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (linux/falloc.h)


def punch_hole(fd: int, length: int) -> bool:
    """Free the disk blocks of bytes [0, length) of ``fd``; False where that fails (a file
    system without holes): the caller falls back to emptying the file."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    except (OSError, AttributeError):
        return False
    return bool(libc.fallocate(fd, _PUNCH_HOLE, 0, length) == 0)


class ChildLog:
    """One child's output file: ``fd`` is the child's stdout and stderr; ``follow`` reads it."""

    def __init__(self, max_bytes: int = MAX_FILE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._file = tempfile.TemporaryFile(prefix="epdserve-child-")  # unlinked at once
        self.fd = self._file.fileno()
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_APPEND)

    def follow(self, proc: subprocess.Popen, on_line: Callable[[str], None]) -> None:
        """Call ``on_line`` for each line the child writes until it exited and all is read.
        Reads with ``pread`` at its own offset (the child shares the file's)."""
        pos, freed, partial, sleep = 0, 0, b"", IDLE_SLEEP_S[0]
        can_punch = True
        while True:
            exited = proc.poll() is not None  # before the read: its last lines are in
            data = os.pread(self.fd, CHUNK, pos)
            if data:
                pos += len(data)
                *lines, partial = (partial + data).split(b"\n")
                if len(partial) > MAX_LINE:
                    lines.append(partial)
                    partial = b""
                for line in lines:
                    on_line(line.decode(errors="replace"))
                if can_punch and pos - freed >= self.max_bytes:
                    can_punch = punch_hole(self.fd, pos)
                    freed = pos
                sleep = IDLE_SLEEP_S[0]
                continue
            if exited:
                break
            if not can_punch and pos >= self.max_bytes:
                os.ftruncate(self.fd, 0)
                pos = 0
            time.sleep(sleep)
            sleep = min(sleep * 2, IDLE_SLEEP_S[1])
        if partial:
            on_line(partial.decode(errors="replace"))

    def close(self) -> None:
        self._file.close()
