"""Cross-check `epdserve bench` against NVIDIA's aiperf: same server, same load, side by side.

Runs each workload with both clients, alternating which goes first, and prints a Markdown
table (mean over repeats, and the difference of aiperf from epdserve bench). aiperf is not a
project dependency: install it in its own virtualenv (it pulls many packages, no torch).

    python -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf==0.13.0
    epdserve up --port 8123 &
    python benchmarks/crosscheck_aiperf.py --base-url http://127.0.0.1:8123 \\
        --aiperf /tmp/aiperf-venv/bin/aiperf [--repeats 2] [--json out.json]
    # or against a server with known timings (services/bench/paced_server.py):
    python benchmarks/crosscheck_aiperf.py --paced 200:20 --rate 4 --aiperf ...

Metric mapping: TTFT = aiperf time_to_first_token; TPOT = aiperf inter_token_latency
((E2E - TTFT) / (OSL - 1) per request); ITL = aiperf inter_chunk_latency; E2EL = aiperf
request_latency.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 1800


def workloads(concurrency: int, rate: float) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (epdserve bench flags, aiperf flags) for the same load."""
    return {
        "closed": (
            ["--request-rate", "inf", "--max-concurrency", str(concurrency)],
            ["--concurrency", str(concurrency)],
        ),
        "open": (
            # Gamma shape 1000: gaps within ~3% of 1/rate, i.e. aiperf's constant schedule.
            ["--request-rate", str(rate), "--burstiness", "1000"],
            ["--request-rate", str(rate), "--arrival-pattern", "constant"],
        ),
    }


# (label, epdserve result-JSON key, aiperf JSON metric, aiperf statistic)
METRICS = [
    ("completed requests", "completed", "request_count", "avg"),
    ("request throughput (req/s)", "request_throughput", "request_throughput", "avg"),
    ("output throughput (tok/s)", "output_throughput", "output_token_throughput", "avg"),
    ("mean TTFT (ms)", "mean_ttft_ms", "time_to_first_token", "avg"),
    ("median TTFT (ms)", "median_ttft_ms", "time_to_first_token", "p50"),
    ("p99 TTFT (ms)", "p99_ttft_ms", "time_to_first_token", "p99"),
    ("mean TPOT (ms)", "mean_tpot_ms", "inter_token_latency", "avg"),
    ("median TPOT (ms)", "median_tpot_ms", "inter_token_latency", "p50"),
    ("mean ITL (ms)", "mean_itl_ms", "inter_chunk_latency", "avg"),
    ("mean E2EL (ms)", "mean_e2el_ms", "request_latency", "avg"),
    ("p99 E2EL (ms)", "p99_e2el_ms", "request_latency", "p99"),
]
CPU_KEY = "client_cpu_s"  # user+sys seconds the client process tree used (whole run)


def run_timed(cmd: list[str], cwd: Path | None = None) -> float:
    """Run ``cmd``; returns the CPU seconds it and its waited-for children used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, timeout=RUN_TIMEOUT_S, stdout=subprocess.DEVNULL, cwd=cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_epdserve(args: argparse.Namespace, flags: list[str], out: Path) -> dict[str, float]:
    cmd = [
        sys.executable, "-m", "services.cli.main", "bench", "--base-url", args.base_url,
        "--endpoint", "completions", "--dataset", "random", "--num-prompts", str(args.requests),
        "--input-len", str(args.isl), "--output-len", str(args.osl), "--seed", "0",
        "--no-progress", "--result-json", str(out), *flags,
    ]  # fmt: skip
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    cpu = run_timed(cmd, cwd=REPO)
    data = json.loads(out.read_text())
    return {CPU_KEY: cpu, **{key: float(data[key]) for _, key, _, _ in METRICS}}


def run_aiperf(args: argparse.Namespace, flags: list[str], out_dir: Path) -> dict[str, float]:
    cmd = [
        args.aiperf, "profile", "--model", args.model, "--url", args.base_url,
        "--endpoint-type", "completions", "--streaming", "--tokenizer", args.tokenizer,
        "--prompt-corpus", "random", "--isl", str(args.isl), "--isl-stddev", "0",
        "--osl", str(args.osl), "--osl-stddev", "0",
        "--extra-inputs", "ignore_eos:true", f"min_tokens:{args.osl}", "temperature:0",
        "--request-count", str(args.requests), "--warmup-request-count", "1",
        "--random-seed", "0", "--use-server-token-count", "--ui", "none",
        "--no-server-metrics", "--no-gpu-telemetry", "--output-artifact-dir", str(out_dir),
        *flags,
    ]  # fmt: skip
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    cpu = run_timed(cmd)
    data = json.loads((out_dir / "profile_export_aiperf.json").read_text())
    return {CPU_KEY: cpu, **{key: float(data[name][stat]) for _, key, name, stat in METRICS}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default=None, help="server to benchmark (or --paced)")
    p.add_argument("--aiperf", required=True, help="path of the aiperf executable")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="served model name")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: embedded model)")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="write every run's numbers here")
    p.add_argument("--workloads", nargs="*", default=["closed", "open"], choices=["closed", "open"])
    p.add_argument("--concurrency", type=int, default=4, help="closed loop: requests in flight")
    p.add_argument("--rate", type=float, default=0.5, help="open loop: requests per second")
    p.add_argument(
        "--paced", default=None, metavar="TTFT_MS:ITL_MS",
        help="start services.bench.paced_server with these timings and benchmark it instead",
    )  # fmt: skip
    args = p.parse_args()
    if not args.base_url and not args.paced:
        p.error("give --base-url URL or --paced TTFT_MS:ITL_MS")
    server = start_paced(args) if args.paced else None
    try:
        return compare(args)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)


def start_paced(args: argparse.Namespace) -> subprocess.Popen[str]:
    """A paced server on a free port; sets ``args.base_url`` and ``args.model``."""
    sys.path.insert(0, str(REPO))
    from services.bench.paced_server import MODEL, READY_PREFIX
    from services.common.net import free_port

    ttft, itl = args.paced.split(":")
    port = free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "services.bench.paced_server", "--port", str(port),
           "--ttft-ms", ttft, "--itl-ms", itl]  # fmt: skip
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(100):  # bounded: the server prints its ready line within a few lines
        line = proc.stdout.readline()
        if line.startswith(READY_PREFIX) or not line:
            break
    if proc.poll() is not None:
        raise RuntimeError("paced server did not start")
    args.base_url, args.model = f"http://127.0.0.1:{port}", MODEL
    return proc


def compare(args: argparse.Namespace) -> int:
    if args.tokenizer is None:
        sys.path.insert(0, str(REPO))
        from services.engine.model_loader import resolve_model

        args.tokenizer = resolve_model(None)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        loads = workloads(args.concurrency, args.rate)
        for name in args.workloads:
            ours, theirs = loads[name]
            runs[name] = {"epdserve": [], "aiperf": []}
            for rep in range(args.repeats):
                order = ["epdserve", "aiperf"] if rep % 2 == 0 else ["aiperf", "epdserve"]
                for tool in order:
                    out = Path(tmp) / f"{len(runs)}-{rep}-{tool}"
                    if tool == "epdserve":
                        res = run_epdserve(args, ours, out.with_suffix(".json"))
                    else:
                        res = run_aiperf(args, theirs, out)
                    runs[name][tool].append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2) + "\n")
    for name, by_tool in runs.items():
        load = f"concurrency {args.concurrency}" if name == "closed" else f"{args.rate:g} req/s"
        print(
            f"\n#### {name} loop ({load}): {args.requests} requests, ISL {args.isl}, OSL {args.osl}\n"
        )
        head = " | ".join(f"run {i + 1} bench / aiperf" for i in range(args.repeats))
        print(f"| metric | {head} | mean bench | mean aiperf | aiperf vs bench |")
        print("|---" * (args.repeats + 4) + "|")
        for label, key, _, _ in [*METRICS, ("client CPU time (s)", CPU_KEY, "", "")]:
            ours_v = [r[key] for r in by_tool["epdserve"]]
            theirs_v = [r[key] for r in by_tool["aiperf"]]
            cells = " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(ours_v, theirs_v, strict=True))
            mo, mt = statistics.mean(ours_v), statistics.mean(theirs_v)
            diff = f"{100.0 * (mt - mo) / mo:+.1f}%" if mo else "n/a"
            print(f"| {label} | {cells} | {mo:.2f} | {mt:.2f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
