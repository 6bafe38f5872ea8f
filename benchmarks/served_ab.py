"""`epdserve up` under vLLM's own client, two or more engine settings alternated round by round.

    VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH=. .venv/bin/python benchmarks/served_ab.py --rounds 5 \\
        --arm off= --arm cap64=max_prefill_tokens_while_decoding=64

Each arm is ``NAME=KEY=VALUE[,KEY=VALUE...]`` (``NAME=`` for the defaults), passed to `epdserve up`
as ``--engine-arg``. Every round starts a fresh `epdserve up` per arm and runs the same `vllm bench
serve` work as ``peer_vllm.py --only serve`` (which it reuses; vLLM's server is not started, only its
client, so the vLLM venv must exist); the arms' order flips every round. One JSON line per run, then
the medians per arm. The tail (ITL p99) is bimodal run to run: decide a default from >= 5 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_vllm as pv  # noqa: E402

METRICS = {"tok/s": "output_throughput", "TTFT p50 ms": "median_ttft_ms",
           "TPOT p50 ms": "median_tpot_ms", "ITL p99 ms": "p99_itl_ms"}  # fmt: skip


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, settings = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"arm {text!r}: NAME=KEY=VALUE[,KEY=VALUE...]")
    return name, [x for kv in filter(None, settings.split(",")) for x in ("--engine-arg", kv)]


def run_once(args: argparse.Namespace, python: Path, engine_args: list[str]) -> dict:
    from services.common.net import free_port

    with tempfile.TemporaryDirectory(prefix="served-ab-") as tmp:
        port, tmp = free_port(), Path(tmp)
        argv = [sys.executable, "-m", "services.cli.main", "up", "--model", args.folder,
                "--served-model-name", args.served_model_name, *engine_args, "--port", str(port)]  # fmt: skip
        server = pv.Server("epdserve up", argv, {"EPDSERVE_CONFIG_DIR": str(tmp / "cfg")}, port,
                           tmp / "server.log")  # fmt: skip
        try:
            server.wait_ready()
            load = os.getloadavg()[0]
            res = pv.bench_serve(args, python, server.url, tmp / "bench.json")
        finally:
            server.stop()
    return {"load": round(load, 2), "completed": res["completed"],
            **{label: round(res[key], 1) for label, key in METRICS.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arm", type=parse_arm, action="append", required=True)
    p.add_argument("--rounds", type=int, default=5)
    own, rest = p.parse_known_args(argv)
    args = pv.parse_args(rest)  # --num-prompts, --max-concurrency, --vllm-venv, --model ...
    python = pv.vllm_python(args.vllm_venv)
    if python is None:
        pv.say(f"no vLLM virtualenv at {args.vllm_venv}: its `vllm bench serve` is the client")
        return 1
    sys.path.insert(0, str(pv.REPO))
    from services.engine.model_files import DEFAULT_MODEL_NAME, resolve_model

    args.folder = resolve_model(args.model)
    args.served_model_name = args.served_model_name or DEFAULT_MODEL_NAME
    runs: dict[str, list[dict]] = {name: [] for name, _ in own.arm}
    for r in range(own.rounds):
        for name, engine_args in own.arm if r % 2 == 0 else own.arm[::-1]:
            row = run_once(args, python, engine_args)
            runs[name].append(row)
            print(json.dumps({"round": r + 1, "arm": name, **row}), flush=True)
    print(f"\n| arm | runs | {' | '.join(METRICS)} (medians) |")
    print("|---|---:|" + "---:|" * len(METRICS))
    for name, rows in runs.items():
        med = [f"{statistics.median(x[label] for x in rows):.1f}" for label in METRICS]
        print(f"| {name} | {len(rows)} | {' | '.join(med)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
