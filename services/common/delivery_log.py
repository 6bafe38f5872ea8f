"""A trace of when each streamed message passes each hop (``EPDSERVE_DELIVERY_LOG=PREFIX``).

One line ``HOP REQUEST_ID TIME`` (``time.monotonic()``, shared by the processes of one machine)
per message per hop, into ``PREFIX.<pid>`` of each process: the worker as it hands a step's
message to gRPC (``w``) and when its generator is resumed after gRPC's write completed
(``wd``: the router may have read the message before), the router as the message reaches
its response (``r``) and after its SSE events went to the client (``s``).
benchmarks/itl_tail.py puts these against the steps and the client's chunk times: where a
late chunk spent its time.
Off unless the variable is set (then one ``if`` a message); a file that cannot be written
turns it off.
"""

from __future__ import annotations

import os
import time
from typing import Any

ENV = "EPDSERVE_DELIVERY_LOG"
_file: Any = None
_on = bool(os.environ.get(ENV))


def mark(hop: str, rid: str) -> None:
    """Record that ``rid``'s current message passed ``hop`` now (a no-op when off)."""
    global _file, _on
    if not _on:
        return
    try:
        if _file is None:
            _file = open(f"{os.environ[ENV]}.{os.getpid()}", "a", buffering=1)  # noqa: SIM115
        _file.write(f"{hop} {rid} {time.monotonic():.6f}\n")
    except OSError:
        _on = False
