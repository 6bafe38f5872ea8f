"""Which engine steps make the served ITL tail: client chunk times matched to the worker's steps.

Each row starts its own `epdserve up` (the default model, one mixed worker) with
``EPDSERVE_STEP_LOG`` set, runs the `epdserve bench` client in this process (random 128 in /
64 out, ignore_eos, 64 prompts at concurrency 16, seed 0: ``benchmarks/peer_vllm.py``'s work),
stops it, and prints the row's tok/s, TTFT p50, TPOT p50 and ITL p99. Then it puts every
inter-chunk gap against the steps: a chunk received at ``b`` came from the last step that
ended before ``b`` (the client, the router and the worker share CLOCK_MONOTONIC:
``perf_counter`` and ``monotonic`` are the same clock on Linux), so a gap ``a -> b`` is the
engine's time between those two steps plus the change in delivery delay. The gaps at or over
the row's p99 are split into causes:

- ``prefill``: a step between the two carried prompt tokens (a wave's prompts, or an
  arrival beside running decodes);
- ``slow decode``: only decode steps, but one took over 2x the row's median decode step
  (GC, a pre-empted thread, the machine's other work);
- ``idle``: the step thread waited between steps (nothing scheduled, or a wake-up late);
- ``delivery``: the engine's interval was short and the chunk was late (router, gRPC, SSE,
  client).

Rows (``--variants``): ``name=ENV=V[,ENV=V...]`` or ``name=engine:FIELD=V``, in turn,
``--rounds`` times, so that the machine's load falls on each alike. Recorded, not asserted;
not in CI.

    PYTHONPATH=. .venv/bin/python benchmarks/itl_tail.py [--rounds 2]
        [--variants "default=,coalesce=EPDSERVE_X=1"] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from bisect import bisect_right
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.served_vs_engine import set_policy  # noqa: E402
from benchmarks.serving_sweep import ready, stop_up  # noqa: E402
from services.common.net import free_port  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    """``name=K=V,K=V`` -> (name, env, engine args); ``engine:F=V`` items are engine args."""
    name, _, rest = text.partition("=")
    env: dict[str, str] = {}
    engine: list[str] = []
    for item in filter(None, rest.split(",")):
        if item.startswith("engine:"):
            engine.append(item[len("engine:") :])
        else:
            k, _, v = item.partition("=")
            env[k] = v
    return name, env, engine


def group_pids(root: int) -> list[int]:
    """``root`` and every process under it (`epdserve up`'s etcd, router, worker: each in a
    session of its own, so not found by process group)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += [c for c, p in parents.items() if p == pid]
    return out


def run_row(args: argparse.Namespace, env: dict[str, str], engine: list[str]) -> dict:
    """One `epdserve up` + bench: the metrics, each request's chunk times, the steps."""
    from services.bench.config import BenchConfig
    from services.bench.runner import run_benchmark

    port = free_port()
    cmd = [sys.executable, "-m", "services.cli.main", "up", "--port", str(port)]
    for a in engine:
        cmd += ["--engine-arg", a]
    with tempfile.TemporaryDirectory() as tmp:
        steps = Path(tmp) / "steps.jsonl"
        hops = Path(tmp) / "hops"
        full = {**os.environ, **env, "EPDSERVE_STEP_LOG": str(steps),
                "EPDSERVE_DELIVERY_LOG": str(hops),
                "EPDSERVE_CONFIG_DIR": str(Path(tmp) / "cfg")}  # fmt: skip
        with open(Path(tmp) / "up.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=full, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            pids: list[int] = []
            try:
                ready(port)
                pids = [os.getpid(), *group_pids(proc.pid)] if args.rt else []
                set_policy(pids, args.rt)
                cfg = BenchConfig(base_url=f"http://127.0.0.1:{port}", num_prompts=args.num_prompts,
                                  max_concurrency=args.concurrency, input_len=128, output_len=64,
                                  ignore_eos=True, seed=0, progress=False)  # fmt: skip
                run = asyncio.run(run_benchmark(cfg))
            finally:
                set_policy(pids, 0)
                stop_up(proc)
        lines = steps.read_text().splitlines() if steps.exists() else []
        marks = [ln.split() for f in Path(tmp).glob("hops.*") for ln in f.read_text().splitlines()]
    chunks = []
    for r in run.results:
        if not r.success:
            continue
        t = [r.start + r.ttft]
        for gap in r.itl:
            t.append(t[-1] + gap)
        chunks.append(t)
    return {"metrics": run.metrics.flat(), "chunks": chunks,
            "steps": [json.loads(x) for x in lines],
            "marks": [(h, rid, float(t)) for h, rid, t in marks]}  # fmt: skip


def engine_side(steps: list[dict]) -> tuple[float, float]:
    """ITL p99 and TPOT p50 (ms) as the engine produced the tokens, free of delivery: a
    sequence's first token at the end of its last prompt step (``pre_ids``), each next one
    at the end of a decode step that ran it (``on_ids``)."""
    times: dict[int, list[float]] = {}
    for s in steps:
        for sid in s.get("pre_ids", []):
            times[sid] = [s["t"]]  # a chunked prompt: its last chunk gives the first token
        for sid in s["on_ids"]:
            times.setdefault(sid, []).append(s["t"])
    gaps = sorted(b - a for t in times.values() for a, b in zip(t, t[1:], strict=False))
    tpots = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    if not gaps:
        return 0.0, 0.0
    return 1e3 * gaps[int(0.99 * (len(gaps) - 1))], 1e3 * statistics.median(tpots)


def classify(row: dict) -> dict:
    """The tail gaps (>= p99) by cause, and the steps' summary."""
    steps = sorted(row["steps"], key=lambda s: s["t"])
    ends = [s["t"] for s in steps]
    prompt = [s["on_tokens"] - s["on_decodes"] for s in steps]
    decode_s = [s["s"] for s, p in zip(steps, prompt, strict=True) if p == 0]
    med = statistics.median(decode_s) if decode_s else 0.0
    gaps = []  # (gap, cause, detail)
    for t in row["chunks"]:
        for a, b in zip(t, t[1:], strict=False):
            gaps.append((b - a, a, b))
    if not gaps or not steps:
        return {}
    p99 = sorted(g for g, _, _ in gaps)[int(0.99 * (len(gaps) - 1))]
    causes: dict[str, list[float]] = {}
    for gap, a, b in gaps:
        if gap < p99:
            continue
        ia, ib = bisect_right(ends, a) - 1, bisect_right(ends, b) - 1
        between = steps[ia + 1 : ib + 1]
        engine_s = ends[ib] - ends[ia] if ia >= 0 else gap
        if any(p for p in prompt[ia + 1 : ib + 1]):
            cause = "prefill"
        elif any(s["s"] > 2 * med for s in between):
            cause = "slow decode"
        elif between and engine_s - sum(s["s"] for s in between) > 0.5 * med:
            cause = "idle"
        else:
            cause = "delivery"
        causes.setdefault(cause, []).append(gap)
    delays = []
    for t in row["chunks"]:
        for b in t[1:]:
            ib = bisect_right(ends, b) - 1
            if ib >= 0:
                delays.append(b - ends[ib])
    arrivals = sorted({a for s in steps for a in s.get("arr", [])})
    within = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b - a < 0.2]
    mixed = [s for s, p in zip(steps, prompt, strict=True) if p and s["on_decodes"]]
    itl99, tpot50 = engine_side(steps)
    return {"p99_gap_ms": p99 * 1e3, "decode_step_ms": med * 1e3,
            "engine_itl_p99_ms": itl99, "engine_tpot_p50_ms": tpot50,
            "causes": {k: (len(v), 1e3 * statistics.median(v)) for k, v in causes.items()},
            "delivery_p50_ms": 1e3 * statistics.median(delays),
            "delivery_p99_ms": 1e3 * sorted(delays)[int(0.99 * (len(delays) - 1))],
            "steps": len(steps), "prefill_steps": sum(1 for p in prompt if p),
            "mixed_steps": len(mixed),
            "arrival_gap_ms": (1e3 * statistics.median(within),
                               1e3 * max(within)) if within else (0.0, 0.0),
            "decode_rows_beside_prompts": sum(s["on_decodes"] for s in mixed)}  # fmt: skip


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[int(q * (len(xs) - 1))] if xs else 0.0


HOPS = ("step>w", "w>r", "r>s", "s>client")


def hop_delays(row: dict) -> dict[str, tuple[float, ...]]:
    """Where each message spent its time, from the delivery log (services/common/delivery_log.py):
    step end -> the worker's yield (``step>w``), -> the router read it (``w>r``), -> its SSE
    events sent (``r>s``), -> the client's chunk (``s>client``); ms p50 / p99 / max of each.
    And the tail gaps (>= the client's p99) split the same way (``tail``: the mean change of
    each hop's delay across the gap, and the engine's own interval): the hop that grew is
    where a late chunk waited. A client request is matched to the router's request id whose
    sends are nearest its chunk times (the client does not see the id)."""
    marks = row.get("marks") or []
    if not marks:
        return {}
    ends = sorted(s["t"] for s in row["steps"])
    by: dict[str, dict[str, list[float]]] = {}
    for hop, rid, t in sorted(marks, key=lambda m: m[2]):
        by.setdefault(hop, {}).setdefault(rid, []).append(t)
    sends = by.get("s", {})
    delays: dict[str, list[float]] = {h: [] for h in HOPS}
    gaps: list[tuple[float, ...]] = []
    for chunk in row["chunks"]:
        near = [r for r in sends if len(sends[r]) >= len(chunk)]
        if not near:
            continue
        rid = min(
            near, key=lambda r: sum(abs(b - s) for b, s in zip(chunk, sends[r], strict=False))
        )
        w, r, s = by["w"][rid], by["r"][rid], by["s"][rid]
        n = min(len(chunk), len(w), len(r), len(s))
        step = [ends[max(0, bisect_right(ends, t) - 1)] for t in w[:n]]
        hop = [(w[k] - step[k], r[k] - w[k], s[k] - r[k], chunk[k] - s[k]) for k in range(n)]
        for k in range(n):
            for name, d in zip(HOPS, hop[k], strict=True):
                delays[name].append(d)
        for k in range(1, n):
            change = tuple(b - a for a, b in zip(hop[k - 1], hop[k], strict=True))
            gaps.append((chunk[k] - chunk[k - 1], step[k] - step[k - 1], *change))
    out: dict[str, tuple[float, ...]] = {
        k: (1e3 * pct(v, 0.5), 1e3 * pct(v, 0.99), 1e3 * max(v)) for k, v in delays.items() if v
    }
    if gaps:
        p99 = pct([g[0] for g in gaps], 0.99)
        tail = [g for g in gaps if g[0] >= p99]
        out["tail"] = tuple(1e3 * statistics.mean(g[i] for g in tail) for i in range(len(HOPS) + 2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--variants", default="default=", help="comma-free list joined by ';'")
    p.add_argument("--json", default=None, help="write every row's raw data here")
    p.add_argument(
        "--rt",
        type=int,
        default=0,
        metavar="PRIORITY",
        help="the timed run's threads (this process, every process of the `up`) in "
        "SCHED_FIFO at PRIORITY, so that a loaded machine's other work does not "
        "pre-empt them (keep --num-prompts small: they hold both cores)",
    )
    p.add_argument("--pause", type=float, default=0.0, help="seconds between rows")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variants.split(";")]
    print("| round | row | tok/s | TTFT p50 | TPOT p50 | ITL p99 | engine TPOT p50 / ITL p99 "
          "| decode step | delivery "
          "p50/p99 | tail causes (n, median ms) | steps (prefill, mixed) | arrival gap "
          "p50/max | load |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    raw = []
    for rnd in range(args.rounds):
        for name, env, engine in variants:
            load = os.getloadavg()[0]
            row = run_row(args, env, engine)
            m, c = row["metrics"], classify(row)
            raw.append({"round": rnd, "name": name, "load": load, **row})
            causes = ", ".join(f"{k} {n} ({ms:.0f})" for k, (n, ms) in
                               sorted(c.get("causes", {}).items()))  # fmt: skip
            print(f"| {rnd} | {name} | {m['output_throughput']:.1f} | {m['median_ttft_ms']:.0f} ms "
                  f"| {m['median_tpot_ms']:.1f} ms | {m['p99_itl_ms']:.1f} ms "
                  f"| {c.get('engine_tpot_p50_ms', 0):.1f} / {c.get('engine_itl_p99_ms', 0):.1f} ms "
                  f"| {c.get('decode_step_ms', 0):.1f} ms "
                  f"| {c.get('delivery_p50_ms', 0):.1f}/{c.get('delivery_p99_ms', 0):.1f} ms "
                  f"| {causes} | {c.get('steps')} ({c.get('prefill_steps')}, "
                  f"{c.get('mixed_steps')}: {c.get('decode_rows_beside_prompts')} rows) "
                  f"| {c.get('arrival_gap_ms', (0, 0))[0]:.1f}/{c.get('arrival_gap_ms', (0, 0))[1]:.1f} ms "
                  f"| {load:.2f} |", flush=True)  # fmt: skip
            hops = hop_delays(row)
            if hops:
                tail = hops.pop("tail", ())
                text = ", ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}/{v[2]:.1f}" for k, v in hops.items())
                if tail:
                    text += "; tail gaps (mean ms): gap {:.1f} = engine {:.1f}".format(*tail[:2])
                    text += "".join(f" + {k} {v:.1f}" for k, v in zip(HOPS, tail[2:], strict=True))
                print(f"|  | hops p50/p99/max ms: {text} |", flush=True)
            if args.json:  # after every row: a stopped run keeps what it measured
                Path(args.json).write_text(json.dumps(raw))
            time.sleep(args.pause)


if __name__ == "__main__":
    main()
