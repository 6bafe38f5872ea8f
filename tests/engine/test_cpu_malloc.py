"""cpu_malloc.keep_freed_memory: a step's freed activations stay mapped for the next step.

Each case runs in a fresh interpreter (malloc's state is the process's): the pattern of a
prefill layer (one large output freed first, then several held together and freed), repeated,
counting the minor page faults of the repeats. glibc's defaults give the top of the heap back
after each repeat (its trim threshold follows the largest chunk freed) and fault it in again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

# Prints the minor faults of 6 repeats after 2 warm ones, and the pages each repeat touches.
_PATTERN = """
import ctypes, os, resource, sys, threading
from services.engine import cpu_malloc
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
MB = 1 << 20
SIZES = [24 * MB, 8 * MB, 12 * MB, 5 * MB, 5 * MB]
print("kept", cpu_malloc.keep_freed_memory(), file=sys.stderr)

def layer():
    big = libc.malloc(24 * MB); libc.memset(big, 1, 24 * MB); libc.free(big)
    held = [libc.malloc(n) for n in SIZES]
    for p, n in zip(held, SIZES):
        libc.memset(p, 1, n)
    for p in held:
        libc.free(p)

def run(out):
    for _ in range(2):
        layer()
    f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(6):
        layer()
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)

out = []
if sys.argv[1] == "thread":  # a thread's own arena, as the worker's step thread has
    t = threading.Thread(target=run, args=(out,)); t.start(); t.join()
else:
    run(out)
print(out[0], (24 * MB + sum(SIZES)) // 4096)
"""


def _faults(where: str, env: dict[str, str] | None = None) -> tuple[int, int]:
    proc = subprocess.run([sys.executable, "-c", _PATTERN, where], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    faults, pages = (int(v) for v in proc.stdout.split())
    return faults, pages


@pytest.mark.parametrize("where", ["main", "thread"])
def test_freed_memory_is_reused_without_page_faults(where: str) -> None:
    faults, pages = _faults(where)
    # Each repeat touches ~80 MB (20k pages); kept memory faults at most a handful.
    assert faults < pages // 10, f"{faults} minor faults in 6 repeats of {pages} pages"


def test_switch_off_leaves_glibcs_defaults() -> None:
    env = {**os.environ, "EPDSERVE_CPU_MALLOC": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", "from services.engine import cpu_malloc as c; "
         "print(c.keep_freed_memory())"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.stdout.strip() == "False", proc.stderr
