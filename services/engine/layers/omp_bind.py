"""Pinning the OpenMP team of the thread that runs the engine's steps (``cpu_cores``).

libgomp keeps one team per thread that starts parallel regions (here the engine's step
thread, or the offline ``LLM``'s caller), and torch's ops and the C kernels share it
(``native.py``: one libgomp in the process). ``bind_team`` pins that team once per calling
thread, through a small C helper (``csrc/omp_bind.c``): every thread to the set, or thread i
to the i-th CPU alone (``cpu_cores="each:..."``, as vLLM's ``VLLM_CPU_OMP_THREADS_BIND``).
Doing it from inside a parallel region moves a team that already exists (the model's load
may have started it), which pinning the calling thread alone would not.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import torch

from services.engine.layers import native

logger = logging.getLogger(__name__)
# (thread id, cpus, each, threads) -> whether that team is bound: decided once per thread.
_done: dict[tuple[int, tuple[int, ...], bool, int], bool] = {}


def bind_team(cpus: list[int], each: bool) -> bool:
    """Pin the calling thread and the OpenMP team it starts to ``cpus`` (one thread per CPU
    when ``each``), once per thread and setting (later calls cost a dict lookup). Returns
    whether the team is pinned; without the C helper only the calling thread is (logged)."""
    if not cpus:
        return False
    n = torch.get_num_threads()
    key = (threading.get_ident(), tuple(cpus), each, n)
    done = _done.get(key)
    if done is None:
        _done[key] = done = pin_team(cpus, each)
    return done


def pin_team(cpus: list[int], each: bool) -> bool:
    """Pin the calling thread and its OpenMP team of ``torch.get_num_threads()`` threads now
    (no memo: ``benchmarks/omp_pinning.py`` switches placements with it). As ``bind_team``."""
    n = torch.get_num_threads()
    # NOTE: the calling thread first, so that a thread libgomp starts later inherits a mask
    # inside the set (with ``each``, thread 0's CPU).
    os.sched_setaffinity(0, cpus[:1] if each else cpus)
    lib = native.library("omp_bind")
    if lib is None:
        logger.warning("cpu_cores: no C helper here; only the step thread is pinned, its "
                       "OpenMP threads may run on any CPU of the process")  # fmt: skip
        return False
    arr = (ctypes.c_int * len(cpus))(*cpus)
    rc = lib.epd_bind_omp_threads(arr, len(cpus), n, int(each))
    if rc != 0:
        logger.warning("cpu_cores: pinning %d OpenMP threads to %s failed (%d)", n, cpus, rc)
        return False
    logger.info("OpenMP team of thread %d pinned to CPUs %s%s", threading.get_native_id(),
                cpus, " (one thread each)" if each else "")  # fmt: skip
    return True
