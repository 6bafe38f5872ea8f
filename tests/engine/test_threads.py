"""The engine's threads carry names the OS shows (top -H, ps -L, py-spy) and run on the
CPUs ``cpu_cores`` gives them."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

from services.common.cpus import parse_cpu_list
from services.engine import AsyncLLMEngine, SamplingParams
from services.engine.config import EngineConfig
from services.engine.threads import name_os_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _comm_of(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def test_a_thread_gets_its_os_name_cut_to_fifteen_bytes():
    seen: dict[str, str] = {}

    def run() -> None:
        name_os_thread("engine-step-and-more")
        seen["comm"] = _comm_of(threading.get_native_id())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["comm"] == "engine-step-and"
    assert _comm_of(threading.get_native_id()) != "engine-step-and"  # only that thread


def _cpus_of(tid: int) -> set[int]:
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return set(parse_cpu_list(line.split(":", 1)[1]))
    raise AssertionError("no Cpus_allowed_list")


def test_cpu_lists_parse_and_bad_ones_fail_in_the_config():
    assert parse_cpu_list("") == []
    assert parse_cpu_list("1") == [1]
    assert parse_cpu_list("3,0-1") == [0, 1, 3]
    for bad in ("x", "2-1", "-1", "1-"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)
    with pytest.raises(ValueError, match="CPU"):
        EngineConfig(model="m", cpu_cores="a-b")
    assert EngineConfig(model="m", cpu_cores="0-1").model_threads == 2
    assert EngineConfig(model="m", cpu_cores="0-1", cpu_threads=1).model_threads == 1
    assert EngineConfig(model="m").model_threads == 0


def test_cpu_cores_pin_the_step_thread_and_its_openmp_team_not_the_io_threads(tiny_model_dir):
    """The step thread and the OpenMP threads it starts run on cpu_cores only; the event
    loop's thread (gRPC, asyncio) keeps every CPU the process may use. Two model threads on
    one CPU, so that there is a team to check (one thread starts none)."""
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    cfg = EngineConfig(
        model=str(tiny_model_dir("llama")), block_size=4, cpu_cores=str(cpu), cpu_threads=2
    )

    async def main() -> tuple[set[int], list[set[int]]]:
        eng = AsyncLLMEngine(cfg)
        await eng.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=4)
            async for _ in eng.generate("r", list(range(1, 40)), params):
                pass
            assert eng._thread is not None and eng._thread.native_id is not None
            step = _cpus_of(eng._thread.native_id)
            team = [_cpus_of(int(t)) for t in os.listdir("/proc/self/task")
                    if _comm_of(int(t)) == "engine-step"]  # fmt: skip
            return step, team
        finally:
            await eng.shutdown()

    step, team = asyncio.run(main())
    assert step == {cpu}
    assert len(team) >= 2 and all(cpus == {cpu} for cpus in team)
    assert _cpus_of(threading.get_native_id()) == allowed


def test_cpu_cores_outside_the_process_mask_fail_at_start(tiny_model_dir):
    cfg = EngineConfig(model=str(tiny_model_dir("llama")), cpu_cores=str(os.cpu_count() + 7))
    with pytest.raises(ValueError, match="may not use"):
        asyncio.run(AsyncLLMEngine(cfg).start())
