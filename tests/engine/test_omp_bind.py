"""``cpu_cores="each:..."``: one OpenMP thread per CPU (thread i on the i-th CPU listed), as
vLLM binds its threads; the CPU lists, and the team really pinned, for the offline ``LLM``
(in a child process: it pins its caller) and for the served engine's step thread."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from services.common.cpus import parse_cpu_cores
from services.engine.config import EngineConfig
from services.engine.layers import native
from tests.engine.engine_cpus import cpus_of, step_thread_cpus

REPO = Path(__file__).resolve().parents[2]
TWO = sorted(os.sched_getaffinity(0))[:2]
needs_two = pytest.mark.skipif(len(TWO) < 2, reason="needs two CPUs")


def test_cpu_core_settings_parse_and_bad_ones_fail_in_the_config():
    assert parse_cpu_cores("") == ([], False)
    assert parse_cpu_cores("0-1") == ([0, 1], False)
    assert parse_cpu_cores("each:3,1") == ([1, 3], True)
    assert parse_cpu_cores(" EACH : 0-1 ") == ([0, 1], True)
    assert parse_cpu_cores("each") == (sorted(os.sched_getaffinity(0)), True)
    for bad in ("each:", "each:x", "every:0", "0-"):
        with pytest.raises(ValueError):
            parse_cpu_cores(bad)
    assert EngineConfig(model="m", cpu_cores="each:0-1").model_threads == 2
    assert EngineConfig(model="m", cpu_cores="each:0-1").pin_each
    assert not EngineConfig(model="m", cpu_cores="0-1").pin_each
    with pytest.raises(ValueError, match="one thread per CPU"):
        EngineConfig(model="m", cpu_cores="each:0", cpu_threads=2)


OFFLINE = """
import os, sys, threading
from services.engine import LLM, SamplingParams
from services.engine.layers import native
if native.library("omp_bind") is None:
    print("SKIP"); raise SystemExit(0)
model, cores = sys.argv[1], sys.argv[2]
params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
prompts = [list(range(1, 30)), list(range(5, 60))]
outs = LLM(model, block_size=4, cpu_cores=cores).generate(prompts, params)
me = threading.get_native_id()
one = sorted(next(iter(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")
             if int(t) != me and len(os.sched_getaffinity(int(t))) == 1)
print(all(len(o.outputs[0].token_ids) == 6 for o in outs), sorted(os.sched_getaffinity(0)), one)
"""


@needs_two
def test_the_offline_llm_pins_its_caller_and_the_team_one_thread_per_cpu(tiny_model_dir):
    """The caller (thread 0 of its team) on the first CPU, the other OpenMP thread on the
    second. Fails on the old code: cpu_cores had no 'each' (and the offline LLM pinned
    nothing)."""
    a, b = TWO
    # NOTE: PASSIVE: spinning threads pinned on a loaded machine (CI) crawl; the placement
    # checked here does not depend on the wait policy.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(OFFLINE), str(tiny_model_dir("llama")),
         f"each:{a},{b}"], env=env, capture_output=True, text=True, timeout=500, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    if out == "SKIP":
        pytest.skip("no C compiler here")
    assert out == f"True [{a}] [{b}]"


@needs_two
def test_the_step_thread_and_its_team_one_thread_per_cpu_not_the_io_threads(tiny_model_dir):
    a, b = TWO
    allowed = os.sched_getaffinity(0)
    cfg = EngineConfig(model=str(tiny_model_dir("llama")), block_size=4, cpu_cores=f"each:{a},{b}")

    step_id, named = step_thread_cpus(cfg)
    step = named[step_id]
    team = [cpus for tid, cpus in named.items() if tid != step_id]
    if native.library("omp_bind") is None:
        pytest.skip("no C compiler here")
    assert step == {a}
    assert team == [{b}]
    assert cpus_of(threading.get_native_id()) == allowed
