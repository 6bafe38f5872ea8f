"""What an engine step costs by its composition: decodes alone, decodes with prompt tokens
beside them, and prompt tokens alone (the default model, in this process).

``--decodes`` sequences (128-token random prompts) are prefilled and kept decoding; then,
rotating through the sizes, a step of those decodes alone, a step of them plus one new
request of K prompt tokens (K in ``--beside``), and, on a second engine state with nothing
running, steps of N x 128 prompt tokens alone (N in ``--waves``). Prints the median of each
and what a prompt token adds. This is the cost model behind the step budget
(docs/performance.md, benchmarks/serving_sim.py): whether prompt rows ride on a decode step
for free, and whether one big prefill step is cheaper per token than several small ones.

``--rt 10`` times the steps (not the model load or the warm-up) with every thread of the
process in ``SCHED_FIFO`` at that priority (needs CAP_SYS_NICE), so other processes on a
shared machine do not pre-empt them; it holds the cores while the timed steps run (seconds
to tens of seconds: keep ``--repeats`` small). Workers run with ``OMP_WAIT_POLICY=PASSIVE``
(`epdserve up`), so this sets it unless given. Recorded, not asserted; not in CI.

    .venv/bin/python benchmarks/step_costs.py [--decodes 16] [--beside 8,16,32,64,128,256]
        [--waves 4,8,16] [--repeats 5] [--rt 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the workers do
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.engine.config import EngineConfig  # noqa: E402
from services.engine.llm_engine import LLMEngine  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402

PROMPT = 128


@contextlib.contextmanager
def realtime(priority: int) -> Iterator[None]:
    """Every thread of this process in SCHED_FIFO at ``priority`` (0: unchanged) inside."""

    def set_all(policy: int, prio: int) -> None:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setscheduler(int(tid), policy, os.sched_param(prio))

    if priority:
        set_all(os.SCHED_FIFO, priority)
    try:
        yield
    finally:
        if priority:
            set_all(os.SCHED_OTHER, 0)


class Bench:
    def __init__(self, engine: LLMEngine, seed: int = 0) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.n = 0

    def add(self, tokens: int, max_tokens: int) -> None:
        self.n += 1
        prompt = [self.rng.randrange(100, 40000) for _ in range(tokens)]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        self.engine.add_request(f"r{self.n}", prompt, params)

    def step(self) -> float:
        t = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--decodes", type=int, default=16)
    p.add_argument("--beside", default="8,16,32,64,128,256", help="prompt tokens beside them")
    p.add_argument("--waves", default="4,8,16", help="128-token prompts in a prefill-only step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rt", type=int, default=0, metavar="PRIORITY",
                   help="time the steps in SCHED_FIFO at this priority (1-99; 0: off)")  # fmt: skip
    a = p.parse_args()
    if not 0 <= a.rt <= 99 or a.repeats < 1 or a.decodes < 1:
        p.error("--rt 0-99, --repeats and --decodes >= 1")
    beside = [int(k) for k in a.beside.split(",") if k]
    waves = [int(k) for k in a.waves.split(",") if k]
    bench = Bench(LLMEngine(EngineConfig()))
    engine = bench.engine
    load = os.getloadavg()[0]

    # Prompt tokens alone: the whole wave in one step (the budget must hold it).
    alone: dict[int, list[float]] = {n: [] for n in waves}
    bench.add(PROMPT, 1)
    bench.step()  # warm-up
    with realtime(a.rt):
        for _ in range(a.repeats):
            for n in waves:
                for _ in range(n):
                    bench.add(PROMPT, 1)
                alone[n].append(bench.step())
                while engine.has_unfinished_requests():
                    engine.step()

    # Decodes alone and with K prompt tokens beside them (each new request ends in its step).
    steps_needed = a.repeats * (len(beside) + 1) + 8
    for _ in range(a.decodes):
        bench.add(PROMPT, steps_needed)
    for _ in range(4):
        engine.step()  # their prefill and first decodes
    mixed: dict[int, list[float]] = {k: [] for k in (0, *beside)}
    with realtime(a.rt):
        for _ in range(a.repeats):
            for k in mixed:
                if k:
                    bench.add(k, 1)
                mixed[k].append(bench.step())

    print(f"load average before {load:.2f}; SCHED_FIFO {a.rt or 'off'}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; medians of {a.repeats}")  # fmt: skip
    print("| step | median | added over the decodes | per prompt token |")
    print("|---|---:|---:|---:|")
    base = statistics.median(mixed[0])
    for k, times in mixed.items():
        m = statistics.median(times)
        added = f"+{1e3 * (m - base):.1f} ms" if k else "–"
        per = f"{1e3 * (m - base) / k:.2f} ms" if k else "–"
        print(f"| {a.decodes} decodes + {k} prompt tokens | {1e3 * m:.1f} ms | {added} | {per} |")
    for n, times in alone.items():
        m = statistics.median(times)
        print(f"| {n * PROMPT} prompt tokens alone ({n} x {PROMPT}) | {1e3 * m:.1f} ms | – | "
              f"{1e3 * m / (n * PROMPT):.2f} ms |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
