"""The engine with its OpenMP threads floating against pinned one per CPU (``cpu_cores``
"each"), quiet and beside a competing process, alternated in one process.

``--work decode`` (default): a decode batch of ``--num-prompts`` sequences (random 128-token
prompts, default model, greedy, fp32) is prefilled once; then the placement alternates
every ``--steps`` decode steps for ``--reps`` rounds, each placement alone and then beside
``--competitors`` busy loops (Python, one core each, not pinned: what a test or a client
looks like to the engine). Prints the median decode step of each phase. Short phases, so
that on a shared machine both placements see the same load.
``--work offline``: ``peer_vllm.py``'s offline run (64 x 128 in / 64 out) per phase instead:
wall tok/s and the process's CPU seconds.

Each libgomp setting (``--settings``: libgomp reads its environment once, at load) runs in a
child process. Prints the load average before each phase. Recorded, not asserted; not in CI.

    .venv/bin/python benchmarks/omp_pinning.py [--work decode|offline] [--num-prompts 16]
        [--settings "default;GOMP_SPINCOUNT=10000"] [--reps 4] [--steps 16] [--competitors 0,1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUSY = "while True:\n    pass\n"


def _phases(args: argparse.Namespace):
    """(round, competitors, placement) in the alternated order."""
    for rep in range(args.reps):
        order = ["float", "each"] if rep % 2 == 0 else ["each", "float"]
        for competitors in args.competitors:
            for placement in order:
                yield rep, competitors, placement


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks import offline
    from services.engine.layers.omp_bind import pin_team
    from services.engine.model_loader import load_hf_config, resolve_model

    folder = resolve_model(None)
    vocab = int(load_hf_config(folder).vocab_size)
    prompts = offline.make_prompts(args.num_prompts, 128, vocab, 0)
    cpus = sorted(os.sched_getaffinity(0))[: torch.get_num_threads()]
    allowed = sorted(os.sched_getaffinity(0))
    if args.work == "offline":
        bench = offline.EngineBench(offline.parse_args(["--skip-hf", "--num-prompts",
                                                        str(args.num_prompts)]), prompts)  # fmt: skip
        run = bench.run
    else:
        engine = _decoding_engine(prompts)

        def run() -> dict:
            steps = []
            for _ in range(args.steps):
                t = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - t)
            return {"decode_step_ms": round(1e3 * statistics.median(steps), 1)}

    first = None
    for rep, competitors, placement in _phases(args):
        ok = pin_team(cpus, True) if placement == "each" else pin_team(allowed, False)
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
        try:
            time.sleep(0.3 if busy else 0)  # the competitor is running
            load = os.getloadavg()[0]
            r = run()
        finally:
            for p in busy:
                p.kill()
                p.wait()
        row = {"rep": rep, "placement": placement, "pinned": ok, "competitors": competitors,
               "load": load}  # fmt: skip
        if args.work == "offline":
            first = first or r["tokens"]
            row.update(tok_s=round(r["output_tok_s"], 1), cpu_s=round(r["cpu_s"], 2),
                       decode_step_ms=round(r["mean_decode_step_ms"], 1),
                       same_tokens=r["tokens"] == first)  # fmt: skip
        else:
            row.update(r)
        print(json.dumps(row), flush=True)


def _decoding_engine(prompts: list[list[int]]):
    """An engine whose every prompt is prefilled and decoding (for as long as asked)."""
    from services.engine.config import EngineConfig
    from services.engine.llm_engine import LLMEngine
    from services.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(max_num_seqs=max(16, len(prompts))))
    params = SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    while len(engine.step()) < len(prompts) or engine.scheduler.waiting:
        pass
    return engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--settings", default="default", help="';'-separated: default or VAR=VALUE")
    p.add_argument("--work", choices=["decode", "offline"], default="decode")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--steps", type=int, default=16, help="decode steps per phase")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--competitors", default="0,1", help="busy loops beside each run, per phase")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.competitors = [int(c) for c in args.competitors.split(",")]
    if args.child:
        child(args)
        return
    for setting in args.settings.split(";"):
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}  # fmt: skip
        if setting != "default":
            name, _, value = setting.partition("=")
            env[name] = value
        print(f"## {setting}", flush=True)
        cmd = [sys.executable, __file__, "--child", "--work", args.work, "--reps", str(args.reps),
               "--steps", str(args.steps), "--num-prompts", str(args.num_prompts),
               "--competitors", ",".join(map(str, args.competitors))]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, timeout=3600)


if __name__ == "__main__":
    main()
