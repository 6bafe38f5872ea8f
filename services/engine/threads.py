"""Names the OS sees for our threads, so that ``top -H``, ``ps -L`` and py-spy tell the
engine's step thread from the OpenMP threads and the gRPC and asyncio threads (Python's
``threading`` names stay inside the interpreter)."""

from __future__ import annotations

import ctypes
import sys

_PR_SET_NAME = 15  # linux/prctl.h
_MAX_NAME = 15  # the kernel keeps 16 bytes, with the terminating NUL


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (cut to 15 bytes) in /proc/<pid>/task/<tid>/comm.
    Linux only; elsewhere, or if the call fails, nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:_MAX_NAME], 0, 0, 0)
    except (OSError, AttributeError):
        pass
