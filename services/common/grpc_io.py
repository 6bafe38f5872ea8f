"""Where a serving process's gRPC I/O runs: on grpc.aio's own poller thread (gRPC's epoll
poller), not on the threads of gRPC's EventEngine.

With the EventEngine (grpcio's default), a message arriving on a socket wakes the engine's
poller thread, which hands the read to a thread of its pool, which completes grpc.aio's
queue, whose poller thread then wakes the event loop: four threads woken for each message
in each process it crosses. With the EventEngine's client and listener turned off
(``GRPC_EXPERIMENTS``), grpc.aio's poller thread polls the sockets itself: two. Measured on 2
cores (benchmarks/RESULTS.md, gw14): a bare mux round trip 0.33-0.44 -> 0.22-0.25 ms, the
gateway's added p50 0.23-0.37 ms lower, the EventEngine's threads woken ~0.1 times a
request instead of ~4.3 in each process.

NOTE: gRPC reads ``GRPC_EXPERIMENTS`` once, when grpc is imported: ``use_poller_io`` runs
first in each service's ``__main__`` (and in ``epdserve worker|router|kvstore``), before
anything imports grpc. An operator's own ``GRPC_EXPERIMENTS`` stands as set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

ENV = "GRPC_EXPERIMENTS"
POLLER_IO = "-event_engine_client,-event_engine_listener"


def use_poller_io(env: MutableMapping[str, str] = os.environ) -> bool:
    """Turn the EventEngine's client and listener off for this process (and the processes
    it starts) unless ``GRPC_EXPERIMENTS`` is set already. False when it changed nothing
    that can still take effect: the variable was set, or grpc is imported already."""
    if ENV in env:
        return False
    env[ENV] = POLLER_IO
    return "grpc" not in sys.modules
