"""The objects a process made while starting, kept out of the cyclic garbage collector's passes.

A full (generation 2) collection walks every tracked object. A router holds ~110k of them after
start-up (modules, the tokenizer, pydantic models), a worker many more (torch, the model's
modules): measured on the 2-core CPU machine under load 14, one full pass stopped the router for
143 ms and the worker for 1.26 s, holding the GIL (every request and engine step waits), about
once in 1,500 requests each. ``gc.freeze`` moves them to the permanent generation, which no pass
walks: later passes walk only what was made since (benchmarks/RESULTS.md, "gw11").
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_objects() -> None:
    """Collect once (start-up's garbage is freed, not kept), then freeze what is alive: called
    when a process is ready, before it serves. NOTE: a frozen object that becomes cyclic
    garbage later is never freed; what start-up made lives as long as the process (a model
    load restarts the process: worker/model_load.py)."""
    began = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug("froze %d start-up objects in %.0f ms", gc.get_freeze_count(),
              (time.perf_counter() - began) * 1000)  # fmt: skip
