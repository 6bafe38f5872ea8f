"""Worker start-up: the seconds and CPU seconds of a worker's imports and its engine's start,
for one or more source trees, alternated in one run (A B A B ...: the load moves under both).

Each run is a fresh interpreter with the tree on PYTHONPATH that imports
``services.worker.main`` (what ``python -m services.worker`` imports before its first line),
builds an ``LLMEngine`` for the model (config, tokenizer, model, KV cache: what the worker's
``engine.start()`` does before it serves) and generates 4 greedy tokens, then reports its phases,
its CPU seconds and which heavy modules it imported.

Run: python benchmarks/worker_startup.py [--trees /work/main .] [--model PATH] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HEAVY = ("torch._dynamo", "torch.distributed.tensor", "transformers.activations", "triton", "sympy")

PROBE = """
import json, os, resource, sys, time
t0 = time.perf_counter()
import services.worker.main
t1 = time.perf_counter()
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
llm = LLM(sys.argv[1], device="cpu", dtype="float32", max_model_len=512, kv_cache_bytes=32 << 20)
t2 = time.perf_counter()
llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
t3 = time.perf_counter()
ru = resource.getrusage(resource.RUSAGE_SELF)
print("PROBE " + json.dumps({
    "import_s": t1 - t0, "engine_s": t2 - t1, "generate_s": t3 - t2,
    "cpu_s": ru.ru_utime + ru.ru_stime,
    "heavy": [m for m in sys.argv[2].split(",") if m in sys.modules],
}), flush=True)
os._exit(0)
"""


def one_run(tree: Path, model: str) -> dict:
    start = os.times()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, model, ",".join(HEAVY)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    end = os.times()
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed in {tree}: {proc.stderr[-2000:]}")
    result = json.loads(lines[-1][len("PROBE ") :])
    result["wall_s"] = end.elapsed - start.elapsed  # interpreter start to exit
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", default=[str(ROOT)], help="source trees (A B ...)")
    parser.add_argument("--model", default=None, help="model folder (default: the tiny llama)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import cached_tiny_model

        model = str(cached_tiny_model("llama", Path(tempfile.mkdtemp(prefix="worker-start-"))))
    trees = [Path(t).resolve() for t in args.trees]
    results: dict[Path, list[dict]] = {t: [] for t in trees}
    for i in range(args.runs):
        for tree in trees:
            load = Path("/proc/loadavg").read_text().split()[0]
            r = one_run(tree, model)
            results[tree].append(r)
            print(
                f"run {i} {tree}: wall {r['wall_s']:.1f} s (imports {r['import_s']:.1f}, engine "
                f"{r['engine_s']:.1f}, 4 tokens {r['generate_s']:.1f}), CPU {r['cpu_s']:.2f} s, "
                f"load {load}, heavy modules: {', '.join(r['heavy']) or 'none'}",
                flush=True,
            )
    for tree, rs in results.items():
        print(
            f"{tree}: median wall {statistics.median(r['wall_s'] for r in rs):.1f} s, "
            f"median CPU {statistics.median(r['cpu_s'] for r in rs):.2f} s ({len(rs)} runs)"
        )
    if len(trees) > 1:
        a = results[trees[0]]
        for tree in trees[1:]:
            cpu = [b["cpu_s"] / x["cpu_s"] for x, b in zip(a, results[tree], strict=True)]
            wall = [b["wall_s"] / x["wall_s"] for x, b in zip(a, results[tree], strict=True)]
            print(
                f"{tree} / {trees[0]}, per pair: CPU {', '.join(f'{c:.2f}' for c in cpu)}; "
                f"wall {', '.join(f'{w:.2f}' for w in wall)}"
            )


if __name__ == "__main__":
    main()
