"""Ending a process that has already shut itself down, without the interpreter's teardown.

NOTE: a worker (or a tensor-parallel rank) has torch, transformers, gRPC and Mooncake loaded.
After its own orderly shutdown (deregistered, drained, servers and engine stopped), Python's
finalization (every module torn down, a last full garbage collection) took 8-11 s of a
2-core machine at a load of 17-19, against 0.5-1.3 s for os._exit (benchmarks/RESULTS.md,
2026-12-04, suite10). Whoever stops a worker waits for that: `epdserve up` and the test
clusters (LocalCluster.stop), a restart, a pod's termination grace, the driver closing its
ranks (5 s, then a kill)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Flush the logs and the standard streams, then end the process with ``code``."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing to keep
            stream.flush()
    os._exit(code)
