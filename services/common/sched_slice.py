"""A short scheduler slice for a serving process's event-loop threads (Linux 6.12+: EEVDF's
per-task slice, ``sched_setattr``'s ``sched_runtime`` for SCHED_OTHER).

Why: a request crosses several threads (client -> router loop -> gRPC poller -> worker loop
-> engine step -> back), and each must wake up. On a host whose cores are busy with other
work, a woken thread of equal or higher weight still waits for the running task to finish
its protected slice (1.4 ms on 2 cores) before it runs: at a load of 17-19 the gateway's
added p50 read 4-6 ms (benchmarks/RESULTS.md, gw14), most of it such waits. A thread that
asks for a short slice gets an earlier deadline and preempts at its wake-up; its CPU share
(its weight) is unchanged. The engine's step thread keeps the default (``default_slice``):
it runs long, and a short slice would only cut its steps into more pieces.

Off unless asked for: ``EPDSERVE_SCHED_SLICE_US`` sets the slice in microseconds (the kernel
takes 100-100,000; 100 is what was measured); unset or 0 leaves the kernel's default. Measured
on 2 shared cores, alternated run by run, it lowered the gateway's added p50 in 5 of 11 pairs
(by 1.3-2.5 ms at load 15-19) and raised it in 4 of the 6 at load 7-12: no clear gain, so not
the default. Best
effort: other kernels or architectures leave the default.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
from collections.abc import Iterator

log = logging.getLogger(__name__)

ENV = "EPDSERVE_SCHED_SLICE_US"
DEFAULT_US = 0  # off: the kernel's default slice (see the module's note)
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}  # sched_setattr, sched_getattr


class _SchedAttr(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32), ("policy", ctypes.c_uint32), ("flags", ctypes.c_uint64),
        ("nice", ctypes.c_int32), ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
        ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64),
        ("util_min", ctypes.c_uint32), ("util_max", ctypes.c_uint32),
    ]  # fmt: skip


def slice_ns() -> int | None:
    """The calling thread's slice in ns as the kernel reports it; None where it cannot tell."""
    attr = _get()
    return None if attr is None else int(attr.runtime)


def short_slice(us: int | None = None) -> bool:
    """Ask for a ``us`` microsecond slice (default: ``EPDSERVE_SCHED_SLICE_US``, else
    DEFAULT_US; 0: none) for the calling thread and the threads it starts from now on; True
    when the kernel took it."""
    if us is None:
        raw = os.environ.get(ENV, "").strip()
        try:
            us = int(raw) if raw else DEFAULT_US
        except ValueError:
            log.warning("ignoring %s=%r: not a whole number of microseconds", ENV, raw)
            us = DEFAULT_US
    return us > 0 and set_slice_ns(us * 1000)


def default_slice() -> bool:
    """Give the calling thread the kernel's default slice back (a long-running thread)."""
    return set_slice_ns(0)


@contextlib.contextmanager
def default_slice_meanwhile() -> Iterator[None]:
    """The calling thread on the kernel's default slice for the block, its own back after.
    NOTE: a process or thread started meanwhile inherits the default: a process inherits the
    slice of the thread that starts it (tensor-parallel ranks spawned from a loop executor
    computed on the loop's 100 us)."""
    before = slice_ns()
    default_slice()
    try:
        yield
    finally:
        if before is not None:
            set_slice_ns(before)


def set_slice_ns(runtime_ns: int) -> bool:
    """The calling thread's slice (0: the kernel's default); True when the kernel took it."""
    attr = _get()
    if attr is None:
        return False
    attr.size, attr.runtime = ctypes.sizeof(attr), runtime_ns
    calls = _SYSCALLS[platform.machine()]
    if ctypes.CDLL(None, use_errno=True).syscall(calls[0], 0, ctypes.byref(attr), 0) != 0:
        return False  # an older kernel, or a policy that takes no slice
    return True


def _get() -> _SchedAttr | None:
    calls = _SYSCALLS.get(platform.machine())
    if calls is None or not hasattr(os, "sched_getaffinity"):  # not Linux
        return None
    attr = _SchedAttr()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(calls[1], 0, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return None
    return attr
