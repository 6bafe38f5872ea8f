"""The engine's decode step under libgomp's wait settings: how long a step waits for its
OpenMP threads to wake (``OMP_WAIT_POLICY=PASSIVE``) against letting them spin
(``GOMP_SPINCOUNT``, ``OMP_WAIT_POLICY=ACTIVE``), on the default model.

Each setting runs in a fresh process (libgomp reads its environment once, at load): 16
random 128-token prompts, 64 tokens out, greedy, every step of `LLMEngine` timed; prints the
median of the steps with 16 decodes and the load average before it. Recorded, not asserted;
not in CI. Spinning wins on cores the model has to itself and loses badly on shared ones,
so compare rows only at a like load (docs/performance.md, "Threads and cores").

    .venv/bin/python benchmarks/omp_wait.py [--settings "OMP_WAIT_POLICY=PASSIVE;GOMP_SPINCOUNT=100000"]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = (
    "OMP_WAIT_POLICY=PASSIVE;GOMP_SPINCOUNT=10000;GOMP_SPINCOUNT=100000;OMP_WAIT_POLICY=ACTIVE"
)
BATCH, PROMPT, OUTPUT = 16, 128, 64


def child() -> None:
    sys.path.insert(0, str(REPO))
    from services.engine.config import EngineConfig
    from services.engine.llm_engine import LLMEngine
    from services.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig())
    rng = random.Random(0)
    for i in range(BATCH):
        prompt = [rng.randrange(100, 40000) for _ in range(PROMPT)]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=OUTPUT, ignore_eos=True))
    steps = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        n = len(engine.step())
        steps.append((time.perf_counter() - t, n))
    full = [s for s, n in steps if n == BATCH][5:]  # past the first decodes' warm-up
    print(f"{1e3 * statistics.median(full):.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--settings", default=SETTINGS, help="';'-separated VAR=VALUE[,VAR=VALUE]")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child()
        return
    print(f"| libgomp setting | load average before | decode step, batch {BATCH} (median) |")
    print("|---|---:|---:|")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for setting in args.settings.split(";"):
        env = dict(base, **dict(kv.split("=", 1) for kv in setting.split(",")))
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, cwd=REPO,
                             capture_output=True, text=True, check=True)  # fmt: skip
        print(f"| `{setting}` | {load:.2f} | {out.stdout.split()[-1]} ms |", flush=True)


if __name__ == "__main__":
    main()
