"""Goodput of a shifting workload under a static role layout vs an adaptive rebalancing policy.

For each policy: `epdserve up --prefill 2 --decode 1 --rebalance-policy P`, then two
`epdserve bench` phases back to back: long prompts with short answers (prefill-heavy), then
short prompts with long answers (decode-heavy). Prints each phase's goodput and the roles at
the end. A benchmark, not a test: the numbers depend on the machine and its other load.

    python benchmarks/rebalance_shift.py --model /path/to/model [--policies static queue]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = {
    # name: epdserve bench flags
    "long-prompts": [
        "--input-len",
        "440",
        "--output-len",
        "4",
        "--num-prompts",
        "1200",
        "--max-concurrency",
        "16",
    ],  # fmt: skip
    "long-answers": [
        "--input-len",
        "16",
        "--output-len",
        "128",
        "--num-prompts",
        "480",
        "--max-concurrency",
        "24",
    ],  # fmt: skip
}


def epdserve(*args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env,
                          cwd=ROOT, text=True, capture_output=True, **kw)  # fmt: skip


def run_policy(policy: str, a: argparse.Namespace, work: Path) -> dict:
    env = {**os.environ, "EPDSERVE_CONFIG_DIR": str(work / f"cfg-{policy}")}
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--model", a.model, "--prefill", "2",
         "--decode", "1", "--port", str(a.port), "--cluster", f"shift-{policy}",
         "--rebalance-policy", policy],
        env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"epdserve up failed: {line!r}")
        if policy != "static":
            r = epdserve("policy", "set", policy, *sum((["--param", p] for p in a.param), []),
                         env=env, timeout=60)  # fmt: skip
            print(r.stdout.strip() or r.stderr.strip(), flush=True)
        out: dict = {"policy": policy, "phases": {}}
        for name, flags in PHASES.items():
            result = work / f"{policy}-{name}.json"
            r = epdserve("bench", "--base-url", f"http://127.0.0.1:{a.port}", *flags,
                         "--goodput", *a.goodput, "--seed", "0", "--ignore-eos", "--no-progress",
                         "--result-json", str(result), env=env, timeout=1800)  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(f"bench failed: {r.stderr[-2000:]}")
            data = json.loads(result.read_text())
            m = data.get("metrics", data)
            out["phases"][name] = {
                k: m[k] for k in ("duration_s", "completed", "failed", "request_goodput",
                                  "request_throughput", "output_throughput", "mean_ttft_ms",
                                  "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms") if k in m
            }  # fmt: skip
            roles = json.loads(epdserve("status", "--json", env=env, timeout=60).stdout)
            out["phases"][name]["roles_after"] = sorted(w["role"] for w in roles["workers"])
            print(policy, name, json.dumps(out["phases"][name]), flush=True)
        decisions = roles["rebalancer"]["decisions"]
        out["flips"] = [f"{d['action']} {d['worker_id']}" for d in decisions if d["applied"]]
        return out
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--policies", nargs="+", default=["static", "queue"])
    p.add_argument("--param", action="append", default=[], help="policy parameter k=v")
    p.add_argument("--goodput", nargs="+", default=["ttft:300", "tpot:30"])
    p.add_argument("--port", type=int, default=18731)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="epdserve-shift-") as tmp:
        results = [run_policy(policy, a, Path(tmp)) for policy in a.policies]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
