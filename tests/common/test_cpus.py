"""CPU pinning: EPDSERVE_CPUS pins a whole process at start (the routers of `epdserve up
--frontend-cores`), threads started before included; bad lists fail at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.cli.cluster_spec import ClusterSpec
from services.cli.launcher import LocalCluster
from services.common.cpus import ENV, parse_cpu_list

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux affinity")

# A thread started before event_loop.run, one started inside it, and the main thread: the
# CPUs each may run on.
CODE = """
import os, threading
from services.common.event_loop import run
gate = threading.Event()
early = threading.Thread(target=gate.wait, daemon=True); early.start()
async def main():
    late = threading.Thread(target=gate.wait, daemon=True); late.start()
    ids = [threading.get_native_id(), early.native_id, late.native_id]
    out = [sorted(os.sched_getaffinity(t)) for t in ids]
    gate.set()
    return out
print(run(main()))
"""


def _run(cpus: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if cpus is not None:
        env[ENV] = cpus
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_epdserve_cpus_pins_every_thread_of_the_process():
    cpu = max(os.sched_getaffinity(0))
    out = _run(str(cpu))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([[cpu]] * 3)
    unpinned = sorted(os.sched_getaffinity(0))
    assert _run(None).stdout.strip() == str([unpinned] * 3)


def test_a_bad_or_unusable_cpu_list_fails_the_process_at_start():
    for bad in ("zero", str(os.cpu_count() + 7)):
        out = _run(bad)
        assert out.returncode != 0 and "ValueError" in out.stderr


def test_frontend_cores_go_to_the_routers_environment_only():
    spec = ClusterSpec(mixed=1, port=0, frontend_cores="0")
    assert LocalCluster(spec).router_env() == {ENV: "0"}
    assert LocalCluster(ClusterSpec(mixed=1, port=0)).router_env() == {}
    with pytest.raises(ValueError, match="CPU"):
        ClusterSpec(mixed=1, port=0, frontend_cores="1-0")
    assert parse_cpu_list("0,2-3") == [0, 2, 3]


def test_a_huge_cpu_range_is_refused_at_once():
    """A range like "0-100000000" (cpu_cores, EPDSERVE_CPUS) expanded 10^8 ids into a set
    before anything could refuse it (over 20 s and gigabytes): now a clear error at once."""
    from services.common.cpus import MAX_CPU_ID, parse_cpu_cores
    from services.engine.config import EngineConfig

    for text in ("0-100000000", f"{MAX_CPU_ID + 1}", "1,3-99999999999999999999"):
        with pytest.raises(ValueError, match="above"):
            parse_cpu_list(text)
    with pytest.raises(ValueError, match="above"):
        parse_cpu_cores("each:0-100000000")
    with pytest.raises(ValueError, match="above"):
        EngineConfig(cpu_cores="0-100000000")
    assert parse_cpu_list(f"{MAX_CPU_ID - 1}-{MAX_CPU_ID}") == [MAX_CPU_ID - 1, MAX_CPU_ID]
