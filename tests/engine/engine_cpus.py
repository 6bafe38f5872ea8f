"""Where a served engine's threads run: the CPUs of its step thread and of the threads named
like it (its OpenMP team), read from /proc after one short request (Linux only)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from services.common.cpus import parse_cpu_list
from services.engine import AsyncLLMEngine, SamplingParams
from services.engine.config import EngineConfig


def comm_of(tid: int) -> str:
    """The OS name of thread ``tid`` of this process."""
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def cpus_of(tid: int) -> set[int]:
    """The CPUs thread ``tid`` of this process may run on."""
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return set(parse_cpu_list(line.split(":", 1)[1]))
    raise AssertionError("no Cpus_allowed_list")


def step_thread_cpus(cfg: EngineConfig) -> tuple[int, dict[int, set[int]]]:
    """Start an engine on ``cfg``, run one 4-token request, and before shutting it down read
    (the step thread's id, {id: CPUs} of every thread named "engine-step", the step thread
    included: the OpenMP team it started carries its name)."""

    async def main() -> tuple[int, dict[int, set[int]]]:
        eng = AsyncLLMEngine(cfg)
        await eng.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=4)
            async for _ in eng.generate("r", list(range(1, 40)), params):
                pass
            assert eng._thread is not None and eng._thread.native_id is not None
            named = {int(t): cpus_of(int(t)) for t in os.listdir("/proc/self/task")
                     if comm_of(int(t)) == "engine-step"}  # fmt: skip
            return eng._thread.native_id, named
        finally:
            await eng.shutdown()

    return asyncio.run(main())
