"""Where a test cluster's start and stop go: a LocalCluster of the tiny random llama (as
tests/cluster/cluster_helpers.start_cluster starts it), each child's output lines with the
seconds since the start began, then the seconds each child took to exit after stop().

Run: python benchmarks/cluster_start.py [--mixed 1] [--prefill 0] [--decode 0] [--runs 1]
Prints one timeline per run and a summary line (start s, stop s) per run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.cli import children  # noqa: E402
from services.cli.cluster_spec import ClusterSpec  # noqa: E402
from services.cli.launcher import LocalCluster  # noqa: E402

EVENTS: list[tuple[float, str, str]] = []
_on_line = children.ManagedProcess._on_line


def _timed_on_line(self: children.ManagedProcess, line: str) -> None:
    EVENTS.append((time.monotonic(), self.name, line))
    _on_line(self, line)


children.ManagedProcess._on_line = _timed_on_line  # type: ignore[method-assign]


def one_run(model: str, args: argparse.Namespace) -> tuple[float, float]:
    EVENTS.clear()
    spec = ClusterSpec(
        model=model, served_model_name="tiny-llama", mixed=args.mixed, prefill=args.prefill,
        decode=args.decode, port=0, cluster="bench", lease_ttl=3,
        engine_overrides={"max_model_len": 512, "kv_cache_bytes": 32 << 20, "max_num_seqs": 16},
    )  # fmt: skip
    cluster = LocalCluster(spec)
    t0 = time.monotonic()
    try:
        cluster.start(timeout=600)
        started = time.monotonic() - t0
    except BaseException:
        cluster.stop()
        raise
    exits: dict[str, float] = {}
    procs = [*cluster.routers, *cluster.workers]

    def watch(p: children.ManagedProcess) -> None:
        p.proc.wait()
        exits[p.name] = time.monotonic()

    watchers = [threading.Thread(target=watch, args=(p,), daemon=True) for p in procs]
    for w in watchers:
        w.start()
    s0 = time.monotonic()
    print(f"stop() at {s0 - t0:.2f}")
    cluster.stop()
    stopped = time.monotonic() - s0
    for w in watchers:
        w.join(timeout=5)
    for t, name, line in EVENTS:
        print(f"{t - t0:7.2f} {name:10s} {line[:150]}")
    print("exits after stop():", {k: round(v - s0, 2) for k, v in sorted(exits.items())})
    return started, stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixed", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=0)
    parser.add_argument("--decode", type=int, default=0)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    from tests.conftest import cached_tiny_model

    model = str(cached_tiny_model("llama", Path(tempfile.mkdtemp(prefix="tiny-llama-"))))
    load = Path("/proc/loadavg").read_text().split()[:3]
    for i in range(args.runs):
        started, stopped = one_run(model, args)
        print(f"run {i}: start {started:.1f} s, stop {stopped:.1f} s (load {' '.join(load)})")
        load = Path("/proc/loadavg").read_text().split()[:3]


if __name__ == "__main__":
    main()
