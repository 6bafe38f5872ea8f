"""Where a child of `epdserve up` writes its output: an unlinked file, never a pipe.

With a pipe, a stopped `up` (Ctrl-Z, SIGSTOP) stops reading, the pipe fills after 64 KiB,
and the next log line blocks the child: a router's event loop, a worker's step. A file
never blocks its writer; `up` follows it when it runs and catches up after a stop.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
import time
from collections.abc import Callable

# NOTE: past this many bytes the reader empties the file once it has read all of it, so a
# long run's logs do not fill the disk; a line written in the instant between the last read
# and the truncation is lost (the child appends: O_APPEND, so it never writes into a hole).
MAX_FILE_BYTES = 64 << 20
CHUNK = 1 << 16
IDLE_SLEEP_S = (0.01, 0.2)  # the poll backs off from the first to the second when idle


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
        pos, partial, sleep = 0, b"", IDLE_SLEEP_S[0]
        while True:
            exited = proc.poll() is not None  # before the read: its last lines are in
            data = os.pread(self.fd, CHUNK, pos)
            if data:
                pos += len(data)
                *lines, partial = (partial + data).split(b"\n")
                for line in lines:
                    on_line(line.decode(errors="replace"))
                sleep = IDLE_SLEEP_S[0]
                continue
            if exited:
                break
            if pos >= self.max_bytes:
                os.ftruncate(self.fd, 0)
                pos = 0
            time.sleep(sleep)
            sleep = min(sleep * 2, IDLE_SLEEP_S[1])
        if partial:
            on_line(partial.decode(errors="replace"))

    def close(self) -> None:
        self._file.close()
