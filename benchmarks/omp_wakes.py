"""How often the engine's OpenMP thread sleeps in a decode step, and what the step costs, under
libgomp's wait settings: the mechanism behind ``OMP_WAIT_POLICY=PASSIVE``'s slower step.

Each setting runs in a fresh process (libgomp reads its environment once, at load): the default
model, 16 random 128-token prompts prefilled and decoding, then 30 decode steps at batch 16
timed. Per step: the median wall, the voluntary context switches of the process's threads other
than the step thread (each one an OpenMP thread going to sleep, to be woken by a futex for the
next parallel region), their involuntary ones (pre-empted by other work), their CPU and the
step thread's. The settings alternate ``--rounds`` times. ``--rt 10`` times the 30 steps with
every thread in ``SCHED_FIFO`` at that priority (~1-2 s: the machine's other work cannot
pre-empt them); without it the steps meet the machine's load as they are. Recorded, not
asserted; not in CI.

    .venv/bin/python benchmarks/omp_wakes.py [--settings "OMP_WAIT_POLICY=PASSIVE;
        OMP_WAIT_POLICY=PASSIVE,GOMP_SPINCOUNT=10000"] [--rounds 2] [--rt 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
SETTINGS = "OMP_WAIT_POLICY=PASSIVE;OMP_WAIT_POLICY=PASSIVE,GOMP_SPINCOUNT=10000"


def threads() -> dict[str, tuple[int, int, float]]:
    """(voluntary, involuntary context switches, CPU seconds) of each thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            status = Path(f"/proc/self/task/{tid}/status").read_text()
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue  # a thread that ended
        vol = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        inv = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        f = stat.rsplit(")", 1)[1].split()
        out[tid] = (vol, inv, (int(f[11]) + int(f[12])) / TICK)
    return out


def set_policy(priority: int) -> None:
    for tid in os.listdir("/proc/self/task"):
        policy = os.SCHED_FIFO if priority else os.SCHED_OTHER
        try:
            os.sched_setscheduler(int(tid), policy, os.sched_param(priority))
        except OSError:
            pass  # a thread that ended; without CAP_SYS_NICE the steps run as they are


def child(rt: int) -> None:
    sys.path.insert(0, str(REPO))
    from services.engine.config import EngineConfig
    from services.engine.llm_engine import LLMEngine
    from services.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig())
    rng = random.Random(0)
    for i in range(16):
        prompt = [rng.randrange(100, 40000) for _ in range(128)]
        engine.add_request(
            f"r{i}", prompt, SamplingParams(max_tokens=60, ignore_eos=True, temperature=0)
        )
    for _ in range(6):
        engine.step()  # the prefill and the first decodes
    main = str(os.getpid())
    set_policy(rt)
    before, walls = threads(), []
    for _ in range(30):
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    after = threads()
    set_policy(0)
    n, others = len(walls), [t for t in after if t != main]

    def added(i: int) -> float:
        return sum(after[t][i] - before.get(t, (0, 0, 0.0))[i] for t in others) / n

    print(json.dumps({"step_ms": 1e3 * statistics.median(walls), "omp_sleeps": added(0),
                      "omp_preempted": added(1), "omp_cpu_ms": 1e3 * added(2),
                      "step_thread_cpu_ms": 1e3 * (after[main][2] - before[main][2]) / n,
                      "load": os.getloadavg()[0]}))  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--settings", default=SETTINGS, help="';' between settings, ',' inside one")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rt", type=int, default=0, metavar="PRIORITY", help="SCHED_FIFO 1-99; 0 off")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if not 0 <= a.rt <= 99 or a.rounds < 1:
        p.error("--rt 0-99, --rounds >= 1")
    if a.child:
        child(a.rt)
        return 0
    print("| round | setting | decode step (batch 16) | OpenMP sleeps a step | pre-empted | "
          "OpenMP CPU | step thread CPU | load |\n|---|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for r in range(a.rounds):
        for setting in a.settings.split(";"):
            env = {k: v for k, v in os.environ.items()
                   if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}  # fmt: skip
            env.update(kv.split("=", 1) for kv in setting.split(","))
            cmd = [sys.executable, __file__, "--child", "--rt", str(a.rt)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if not lines:
                print(f"| {r} | {setting} | failed: {out.stderr[-300:]!r} |", flush=True)
                continue
            d = json.loads(lines[-1])
            print(f"| {r} | {setting} | {d['step_ms']:.1f} ms | {d['omp_sleeps']:.1f} | "
                  f"{d['omp_preempted']:.1f} | {d['omp_cpu_ms']:.1f} ms | "
                  f"{d['step_thread_cpu_ms']:.1f} ms | {d['load']:.1f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
