"""Which CPUs a process or a thread runs on (Linux affinity masks).

On a small machine the model's OpenMP threads stall whenever an I/O thread (the worker's
gRPC and asyncio threads, the router, etcd, a client) takes one of their cores in the middle
of a parallel region. Pinning the model to some CPUs and the rest elsewhere keeps them apart,
as vLLM's CPU backend does (its model on one core, its frontend on another):
``EngineConfig.cpu_cores`` pins the engine's step thread and its OpenMP team (to a set, or
one thread per CPU with ``each:``),
``EPDSERVE_CPUS`` a whole process from its start (`epdserve up --frontend-cores` sets it for
the routers). See docs/performance.md.
"""

from __future__ import annotations

import os

ENV = "EPDSERVE_CPUS"
# The largest CPU id a list may name: above any machine's (Linux builds for at most 8,192),
# and small enough that a range up to it costs nothing to expand. "0-100000000" took minutes
# and gigabytes to expand before the process could say it was wrong.
MAX_CPU_ID = 65535


def parse_cpu_list(text: str) -> list[int]:
    """CPU ids from Linux's list syntax ("1", "0-3", "1,3-5"), sorted; [] for "". ValueError
    for anything else."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}: want ids like 1 or 0-3,6") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        if last > MAX_CPU_ID:
            raise ValueError(f"CPU id {last} in {text!r} is above {MAX_CPU_ID}")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


EACH = "each"


def parse_cpu_cores(text: str) -> tuple[list[int], bool]:
    """``EngineConfig.cpu_cores``: (CPU ids, one thread per CPU). "" is not pinned; a list
    ("1", "0-3") pins the step thread's OpenMP team to that set (its threads float inside
    it); "each:LIST" pins thread i of the team to the i-th CPU listed, as vLLM's CPU backend
    binds; "each" alone does so on every CPU this process may use. ValueError otherwise."""
    text = text.strip()
    mode, colon, rest = text.partition(":")
    if mode.strip().lower() != EACH:
        return parse_cpu_list(text), False
    if not colon:
        return sorted(os.sched_getaffinity(0)), True
    cpus = parse_cpu_list(rest)
    if not cpus:
        raise ValueError(f"bad CPU list {text!r}: 'each:' needs CPUs (each:0-1), or say 'each'")
    return cpus, True


def check_usable(cpus: list[int], what: str) -> None:
    """ValueError unless this process may run on every CPU of ``cpus``."""
    allowed = os.sched_getaffinity(0)
    if not set(cpus) <= allowed:
        raise ValueError(f"{what} names CPUs this process may not use (it may use "
                         f"{','.join(map(str, sorted(allowed)))})")  # fmt: skip


def pin_os_thread(cpus: list[int]) -> None:
    """Run the calling thread (and the threads it starts from now on, such as the OpenMP
    team of its first parallel region) on ``cpus`` only. Linux: ``sched_setaffinity(0)``
    applies to the calling thread alone."""
    os.sched_setaffinity(0, cpus)


def pin_process(pid: int, cpus: list[int]) -> None:
    """Run every thread of process ``pid`` on ``cpus`` (threads started later inherit the
    mask from their creator). A thread that ends meanwhile is skipped."""
    for _ in range(2):  # NOTE: a thread started during the first pass is caught by the second
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:
                continue


def pin_from_env() -> None:
    """Pin this whole process to ``EPDSERVE_CPUS`` when it is set (ValueError for a bad or
    unusable list: the process fails at start, not later)."""
    cpus = parse_cpu_list(os.environ.get(ENV, ""))
    if cpus:
        check_usable(cpus, f"{ENV}={os.environ[ENV]!r}")
        pin_process(os.getpid(), cpus)
