"""The command lines of cluster processes, built from their config dataclasses.

`epdserve up`, the tests and (later) the Helm chart all start workers and routers through
these two functions, so flags cannot drift between them.
"""

from __future__ import annotations

import sys

from services.common.dataclass_cli import to_argv
from services.engine.config import EngineConfig
from services.kvstore.config import KVStoreConfig
from services.router.config import RouterConfig
from services.worker.config import WorkerConfig


def worker_command(
    worker: WorkerConfig, engine: EngineConfig, python: str | None = None
) -> list[str]:
    """argv that starts one worker process with these settings."""
    return [python or sys.executable, "-m", "services.worker", *to_argv(worker), *to_argv(engine)]


def router_command(router: RouterConfig, python: str | None = None) -> list[str]:
    """argv that starts one router process with these settings."""
    return [python or sys.executable, "-m", "services.router", *to_argv(router)]


def kvstore_command(kvstore: KVStoreConfig, python: str | None = None) -> list[str]:
    """argv that starts the kvstore (global KV index + its mooncake_master)."""
    return [python or sys.executable, "-m", "services.kvstore", *to_argv(kvstore)]
