"""The engine's threads carry names the OS shows (top -H, ps -L, py-spy) and run on the
CPUs ``cpu_cores`` gives them."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from services.common.cpus import parse_cpu_list
from services.engine import AsyncLLMEngine
from services.engine.config import EngineConfig
from services.engine.threads import name_os_thread
from tests.engine.engine_cpus import comm_of, cpus_of, step_thread_cpus

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def test_a_thread_gets_its_os_name_cut_to_fifteen_bytes():
    seen: dict[str, str] = {}

    def run() -> None:
        name_os_thread("engine-step-and-more")
        seen["comm"] = comm_of(threading.get_native_id())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["comm"] == "engine-step-and"
    assert comm_of(threading.get_native_id()) != "engine-step-and"  # only that thread


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

    step_id, named = step_thread_cpus(cfg)
    step, team = named[step_id], list(named.values())
    assert step == {cpu}
    assert len(team) >= 2 and all(cpus == {cpu} for cpus in team)
    assert cpus_of(threading.get_native_id()) == allowed


def test_cpu_cores_outside_the_process_mask_fail_at_start(tiny_model_dir):
    cfg = EngineConfig(model=str(tiny_model_dir("llama")), cpu_cores=str(os.cpu_count() + 7))
    with pytest.raises(ValueError, match="may not use"):
        asyncio.run(AsyncLLMEngine(cfg).start())
