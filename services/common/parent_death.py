"""Children that end with the process that started them (Linux ``PR_SET_PDEATHSIG``).

`epdserve up` stops its children when it is told to; killed outright (``kill -9``, the OOM
killer, a CI runner's timeout) it could not, and its etcd, workers and routers ran on as
orphans holding their ports and memory. A child started with ``die_with_parent()`` as its
``preexec_fn`` gets SIGTERM (a graceful stop) when its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


# Looked up here, in the parent: the forked child only calls it (no import, no allocation).
_PRCTL = _load_prctl()


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A Popen ``preexec_fn`` that has the child sent ``sig`` when this process dies; None
    where that cannot work: not Linux, or not called on the main thread (the kernel sends
    the signal when the *thread* that forked the child ends, and only the main thread lives
    as long as the process)."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl, parent = _PRCTL, os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal would come
            os._exit(1)

    return preexec
