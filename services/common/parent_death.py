"""Children that end with the process that started them (Linux ``PR_SET_PDEATHSIG``).

`epdserve up` stops its children when it is told to; killed outright (``kill -9``, the OOM
killer, a CI runner's timeout) it could not, and its etcd, workers and routers ran on as
orphans holding their ports and memory. A command wrapped by ``with_parent_death`` gets
SIGTERM (a graceful stop) when its parent dies.

NOTE: not a Popen ``preexec_fn``: that makes Python fork() and run at-fork handlers in the
child, and gRPC's (active in `up`, whose liveness probes speak gRPC) aborted the child
(SIGABRT, "epoll_wait error: Bad file descriptor") before its exec. A small interpreter
sets the signal and execs the command instead (same pid; the setting survives execve).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# argv[1]: the signal, argv[2]: the parent's pid, argv[3:]: the command. A parent already
# gone before prctl would send nothing: exit then.
_WRAPPER = (
    "import ctypes, os, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, int(sys.argv[1]), 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[2]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


def with_parent_death(argv: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """``argv`` run so that it is sent ``sig`` when this process dies; ``argv`` itself where
    that cannot work: not Linux, or not on the main thread (the kernel signals when the
    *thread* that forked the child ends, and only the main thread lives as long as the
    process)."""
    if not sys.platform.startswith("linux"):
        return argv
    if threading.current_thread() is not threading.main_thread():
        return argv
    # -I -S: the wrapper reads no environment or site-packages (fast, and unaffected by them).
    return [sys.executable, "-I", "-S", "-c", _WRAPPER, str(int(sig)), str(os.getpid()), *argv]
