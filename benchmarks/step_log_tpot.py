"""Online TPOT rebuilt from the engine's step log, with and without the machine's waits.

``EPDSERVE_STEP_LOG=FILE python benchmarks/colocation.py --rounds N --no-fcfs`` logs every
engine step (services/engine/step_log.py). For each online request this takes the steps that
decoded it and gives two TPOTs: the mean wall time of those steps (what the request saw,
other processes' delays included) and the mean CPU time of the step thread in them (the
engine's own work, as on a machine with nothing else running). On a shared CPU the first has
a tail made by the machine; the second compares online alone with tiers on the engine's work.

Phases come from the log itself: each stretch of steps with offline tokens (gaps under 30 s)
is a tiers run; its online requests are those whose first decode step came 5 s after its
first offline step or later (colocation.py starts the offline load 5 s early), and the online
alone run is the 60 s before it. Requests with fewer than 8 decode steps are left out.

    python benchmarks/step_log_tpot.py STEPS.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

GAP_S = 30.0  # offline tokens missing this long end a tiers run
ALONE_S = 60.0  # colocation.py's --seconds (the online alone run before a tiers run)
MIN_STEPS = 8


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def phases(rows: list[dict]) -> list[tuple[float, float]]:
    """(start, end) of each tiers run: stretches of steps with offline tokens."""
    out: list[list[float]] = []
    for r in rows:
        if r["off_tokens"] > 0:
            if out and r["t"] - out[-1][1] < GAP_S:
                out[-1][1] = r["t"]
            else:
                out.append([r["t"], r["t"]])
    return [(a, b) for a, b in out]


def requests(rows: list[dict]) -> dict[int, tuple[float, list[float], list[float]]]:
    """seq_id -> (time of its first decode step, its steps' CPU seconds, wall seconds)."""
    per: dict[int, tuple[float, list[float], list[float]]] = {}
    steps: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in rows:
        for seq_id in r.get("on_ids", []):
            cpu, wall = steps[seq_id]
            if not cpu:
                per[seq_id] = (r["t"], cpu, wall)
            cpu.append(r["cpu"])
            wall.append(r["s"])
    return per


def main() -> int:
    rows = [json.loads(line) for line in open(sys.argv[1])]
    per = requests(rows)
    runs: dict[str, tuple[list[float], list[float]]] = {}
    for k, (start, end) in enumerate(phases(rows), 1):
        for name, lo, hi in ((f"alone #{k}", start - ALONE_S - 2, start - 2),
                             (f"tiers #{k}", start + 5, end)):  # fmt: skip
            chosen = [p for p in per.values() if lo <= p[0] <= hi and len(p[1]) >= MIN_STEPS]
            cpu = [statistics.fmean(p[1]) * 1e3 for p in chosen]
            wall = [statistics.fmean(p[2]) * 1e3 for p in chosen]
            runs[name] = (cpu, wall)
            if chosen:
                print(f"{name}: {len(chosen)} requests, TPOT P50 / P99 ms: CPU "
                      f"{pct(cpu, 50):.1f} / {pct(cpu, 99):.1f}, wall "
                      f"{pct(wall, 50):.1f} / {pct(wall, 99):.1f}")  # fmt: skip
    for i, label in ((0, "CPU"), (1, "wall")):
        alone = [x for n, r in runs.items() if n.startswith("alone") for x in r[i]]
        tiers = [x for n, r in runs.items() if n.startswith("tiers") for x in r[i]]
        if alone and tiers:
            print(f"pooled {label}: alone {pct(alone, 50):.1f} / {pct(alone, 99):.1f} "
                  f"({len(alone)}), tiers {pct(tiers, 50):.1f} / {pct(tiers, 99):.1f} "
                  f"({len(tiers)}); tiers / alone P50 {pct(tiers, 50) / pct(alone, 50):.2f}, "
                  f"P99 {pct(tiers, 99) / pct(alone, 99):.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
