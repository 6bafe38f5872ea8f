"""Where the CPU goes while `epdserve up` serves: CPU seconds of every process and thread of
the cluster (and of the client) over one `epdserve bench` run (the work of
``benchmarks/peer_vllm.py``: 64 random prompts, 128 in / 64 out, ignore_eos, concurrency 16).

Per thread, from /proc/<pid>/task/<tid>/stat before and after the run; thread names are the
OS's: the engine's step thread is ``engine-step``, and the model's OpenMP threads, which it
starts, inherit that name (the lowest thread id of them is the step thread itself). CPU seconds are less sensitive to other load than wall time, but a loaded
machine still inflates them (cache misses, wake-ups). Recorded, not asserted; not in CI.

    .venv/bin/python benchmarks/serving_cpu_split.py [--num-prompts 64] [-- up flags...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from serving_sweep import free_port, ready, stop_up  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: str) -> tuple[str, list[str]]:
    text = Path(path).read_text()
    return text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(f"/proc/{entry}/stat")[1][1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_by_thread(root: int) -> dict[tuple[int, int], tuple[str, str, float]]:
    """(pid, tid) -> (process command line, thread name, user + system CPU seconds)."""
    found = {}
    for pid in descendants(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
            for tid in os.listdir(f"/proc/{pid}/task"):
                name, f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
                found[(pid, int(tid))] = (cmd, name, (int(f[11]) + int(f[12])) / TICK)
        except OSError:
            continue  # ended meanwhile
    return found


def short(cmd: str) -> str:
    for mod in ("services.worker", "services.router", "mooncake_master", "etcd"):
        if mod in cmd:
            return mod + (
                " " + cmd.split("--instance-id ")[1].split()[0] if "--instance-id" in cmd else ""
            )
    return cmd[:60]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("up_args", nargs="*", help="extra `epdserve up` flags (after --)")
    args = p.parse_args()
    port = free_port()
    up = [sys.executable, "-m", "services.cli.main", "up", "--port", str(port), *args.up_args]
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "up.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(up, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            ready(port)
            time.sleep(2)  # start-up work done
            before, t0, load = cpu_by_thread(proc.pid), time.monotonic(), os.getloadavg()[0]
            out = Path(tmp) / "bench.json"
            bench = [sys.executable, "-m", "services.cli.main", "bench", "--base-url",
                     f"http://127.0.0.1:{port}", "--num-prompts", str(args.num_prompts),
                     "--max-concurrency", "16", "--input-len", "128", "--output-len", "64",
                     "--ignore-eos", "--seed", "0", "--no-progress", "--result-json", str(out)]  # fmt: skip
            start = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(bench, cwd=REPO, check=True, stdout=subprocess.DEVNULL, timeout=1800)
            end = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall = time.monotonic() - t0
            after = cpu_by_thread(proc.pid)
            r = json.loads(out.read_text())
        finally:
            stop_up(proc)
            log.close()
    client = (end.ru_utime + end.ru_stime) - (start.ru_utime + start.ru_stime)
    print(f"{wall:.1f} s wall, load average {load:.2f} before; {r['output_throughput']:.1f} "
          f"output tok/s, TPOT p50 {r['median_tpot_ms']:.1f} ms, ITL p50 {r['median_itl_ms']:.1f} ms\n")  # fmt: skip
    print("| process | thread | CPU s | share of wall |\n|---|---|---:|---:|")
    print(f"| bench client | (all) | {client:.1f} | {client / wall:.0%} |")
    rows: dict[tuple[str, str], float] = {}
    for key, (cmd, name, cpu) in after.items():
        used = cpu - before.get(key, ("", "", 0.0))[2]
        if used > 0:
            # OpenMP threads inherit the name of the thread that started them (engine-step).
            group = (short(cmd), f"{name} ({key[1]})")
            rows[group] = rows.get(group, 0.0) + used
    for (proc_name, thread), cpu in sorted(rows.items(), key=lambda kv: -kv[1]):
        if cpu >= 0.1:
            print(f"| {proc_name} | {thread} | {cpu:.1f} | {cpu / wall:.0%} |")


if __name__ == "__main__":
    main()
