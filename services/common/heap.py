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

log = logging.getLogger(__name__)


def freeze_startup_objects() -> None:
    """Freeze what is alive: called when a process is ready, before it serves. NOTE: no
    collection first: start-up leaves little cyclic garbage (87 objects in a worker, 12 in a
    router, no RSS freed), and a full pass over a worker's ~490k objects cost 2.2 s of its start
    at load 30. A frozen object that becomes cyclic garbage later is never freed; what start-up
    made lives as long as the process (a model load restarts the process: worker/model_load.py)."""
    gc.freeze()
    log.debug("froze %d start-up objects", gc.get_freeze_count())
