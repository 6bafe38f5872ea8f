"""`epdserve up` under one serving load, across engine budgets and CPU placements.

Each configuration starts its own `epdserve up` (the default model, one mixed worker), runs
`epdserve bench` against it (random 128 in / 64 out, ignore_eos, 64 prompts at concurrency
16, seed 0: the work of ``benchmarks/peer_vllm.py``), stops it, and prints one row: output
tok/s, TTFT p50, TPOT p50, ITL p99. Configurations, one at a time:

- the step's token budget (``max_num_batched_tokens``: decode tokens first, then prefill
  chunks filling the rest; the default 2048), at 256, 1024, 2048 and 4096;
- CPU placement of the worker's model threads: the default (every core), one thread
  (``cpu_threads=1``: vLLM's CPU default on a 2-core machine, the other core left to
  everything else), and OpenMP threads that spin between parallel regions
  (``OMP_WAIT_POLICY=ACTIVE``; `epdserve up` gives its workers PASSIVE unless the variable is
  set), and vLLM's CPU layout: the model's one thread pinned to CPU 1 (``cpu_cores=1``), the
  routers to CPU 0 (``--frontend-cores 0``).

``--only wait``: libgomp's wait policy of the worker (PASSIVE, `epdserve up`'s default, against
spinning ~0.1 ms and ~1 ms before sleeping), ``--rounds`` times in turn, so that the load
falls on each alike (issue 17: the quiet run decides whether a machine of the model's own
should spin).

``--only c1``: the serving path's own cost. One request at a time (8 prompts, concurrency 1)
through `epdserve up`, then the offline engine in this process on the same prompts one at a
time; prints served TPOT p50 against the offline decode step (issue 17's target: within 1.1x).

Recorded, not asserted; not in CI. On a shared machine the rows compare only when the load
average (printed before each) is alike.

    .venv/bin/python benchmarks/serving_sweep.py [--num-prompts 64]
        [--only budget|placement|wait|c1] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.common.net import free_port, open_direct

REPO = Path(__file__).resolve().parent.parent
# (label, engine args, extra environment)
BUDGETS = [
    ("budget 256", ["max_num_batched_tokens=256"], {}),
    ("budget 1024", ["max_num_batched_tokens=1024"], {}),
    ("budget 2048 (default)", [], {}),
    ("budget 4096", ["max_num_batched_tokens=4096"], {}),
]
PLACEMENTS = [
    ("threads: all cores, sleeping between ops (default)", [], {}),
    ("threads: 1 (cpu_threads=1)", ["cpu_threads=1"], {}),
    ("threads: all, spinning (OMP_WAIT_POLICY=ACTIVE)", [], {"OMP_WAIT_POLICY": "ACTIVE"}),
    (
        "threads: 1 pinned to CPU 1, routers on CPU 0 (vLLM's layout)",
        ["cpu_cores=1", "--frontend-cores=0"],
        {},
    ),
]
# libgomp's wait between parallel regions for the worker's model threads, as `epdserve up` is
# run: its workers get OMP_WAIT_POLICY=PASSIVE unless that is set; GOMP_SPINCOUNT wins over
# the policy (libgomp env.c), ~100,000 spins a millisecond. Which wins depends on whether the
# cores are the model's own (docs/performance.md, "Threads and cores").
WAITS = [
    ("OMP_WAIT_POLICY=PASSIVE (epdserve up's default)", [], {}),
    ("GOMP_SPINCOUNT=10000 (spin ~0.1 ms, then sleep)", [], {"GOMP_SPINCOUNT": "10000"}),
    ("GOMP_SPINCOUNT=100000 (~1 ms)", [], {"GOMP_SPINCOUNT": "100000"}),
]
KEYS = [("output tok/s", "output_throughput", ""), ("TTFT p50", "median_ttft_ms", " ms"),
        ("TPOT p50", "median_tpot_ms", " ms"), ("ITL p99", "p99_itl_ms", " ms")]  # fmt: skip


def ready(port: int, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open_direct(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if json.load(r)["data"]:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"epdserve up on port {port} not ready after {timeout:.0f} s")


def run_one(
    args: argparse.Namespace, engine_args: list[str], env: dict[str, str], concurrency: int = 16
) -> dict:
    port = free_port()
    up = [sys.executable, "-m", "services.cli.main", "up", "--port", str(port)]
    for a in engine_args:  # an EngineConfig field=value, or an `epdserve up` flag (--flag=value)
        up += [a] if a.startswith("--") else ["--engine-arg", a]
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "up.log", "w")  # noqa: SIM115 - closed below
        # Its admin token and router URL go to a folder of its own, not the user's
        # ~/.config/epdserve, where they would replace those of the user's own cluster.
        env = {**os.environ, **env, "EPDSERVE_CONFIG_DIR": str(Path(tmp) / "epdserve-config")}
        proc = subprocess.Popen(up, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            ready(port)
            out = Path(tmp) / "bench.json"
            bench = [sys.executable, "-m", "services.cli.main", "bench", "--base-url",
                     f"http://127.0.0.1:{port}", "--num-prompts", str(args.num_prompts),
                     "--max-concurrency", str(concurrency), "--input-len", "128", "--output-len", "64",
                     "--ignore-eos", "--seed", "0", "--no-progress", "--result-json", str(out)]  # fmt: skip
            subprocess.run(bench, cwd=REPO, check=True, stdout=subprocess.DEVNULL, timeout=1800)
            return json.loads(out.read_text())
        finally:
            stop_up(proc)
            log.close()


def stop_up(proc: subprocess.Popen) -> None:
    """Stop an `epdserve up` started in its own session: SIGINT, then SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def offline_step_ms(num_prompts: int) -> float:
    """The offline engine's mean decode step at batch 1 (``benchmarks/offline.py``'s
    ``EngineBench`` with one sequence at a time), 128-token random prompts, 64 tokens out."""
    # As `epdserve up` starts its workers (launcher.WORKER_ENV_DEFAULTS); before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(REPO))
    from benchmarks import offline

    args = offline.parse_args(["--num-prompts", str(num_prompts), "--max-num-seqs", "1",
                               "--input-len", "128", "--output-len", "64", "--skip-hf"])  # fmt: skip
    prompts = offline.make_prompts(num_prompts, 128, 40000, seed=0)
    return offline.EngineBench(args, prompts).run()["mean_decode_step_ms"]


def concurrency_one(args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    served = run_one(argparse.Namespace(num_prompts=8), [], {}, concurrency=1)
    step = offline_step_ms(8)
    tpot = served["median_tpot_ms"]
    print("\n| concurrency 1 | served TPOT p50 | offline decode step | ratio | load avg before |")
    print("|---|---:|---:|---:|---:|")
    print(f"| `epdserve up` vs `LLM` | {tpot:.1f} ms | {step:.1f} ms | {tpot / step:.2f}x "
          f"| {load:.2f} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--only", choices=["budget", "placement", "wait", "c1"], default=None)
    p.add_argument("--rounds", type=int, default=1, help="run each list this often, in turn")
    p.add_argument("--budgets", default=None, metavar="N,N,...",
                   help="budgets to run instead of 256, 1024, the default and 4096")  # fmt: skip
    args = p.parse_args()
    if args.only == "c1":
        concurrency_one(args)
        return
    budgets = BUDGETS
    if args.budgets:
        budgets = [(f"budget {n}", [f"max_num_batched_tokens={n}"], {})
                   for n in args.budgets.split(",")]  # fmt: skip
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    configs = {"budget": budgets, "placement": PLACEMENTS, "wait": WAITS}
    for name, rows in configs.items():
        if args.only not in (None, name):
            continue
        print(f"\n| {name} | " + " | ".join(k for k, _, _ in KEYS) + " | load avg before |")
        print("|---|" + "---:|" * (len(KEYS) + 1))
        for label, engine_args, env in rows * args.rounds:
            load = os.getloadavg()[0]
            r = run_one(args, engine_args, env)
            cells = " | ".join(f"{r[key]:.1f}{unit}" for _, key, unit in KEYS)
            print(f"| {label} | {cells} | {load:.2f} |", flush=True)


if __name__ == "__main__":
    main()
