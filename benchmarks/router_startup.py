"""Router start-up: seconds from exec to its ready line, and its RSS, with and without torch.

Run: python benchmarks/router_startup.py [--model PATH] [--runs 3]
The router needs no etcd to start (it retries the listing in the background).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _torch_loaded(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps


def one_run(model: str) -> tuple[float, float, bool]:
    cmd = [
        sys.executable,
        "-m",
        "services.router",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--etcd",
        "127.0.0.1:1",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("EPDSERVE_ROUTER_READY"):
                break
        else:
            raise RuntimeError("router exited before its ready line")
        seconds = time.perf_counter() - start
        time.sleep(1.0)
        return seconds, _rss_mb(proc.pid), _torch_loaded(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default=None, help="model folder (default: a tiny llama built here)"
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model = args.model
    if model is None:
        import tempfile

        from tests.conftest import build_tiny_model

        model = str(build_tiny_model("llama", Path(tempfile.mkdtemp(prefix="router-startup-"))))
    runs = [one_run(model) for _ in range(args.runs)]
    secs = [r[0] for r in runs]
    rss = [r[1] for r in runs]
    print(
        f"router start-up: median {statistics.median(secs):.2f} s (runs {', '.join(f'{s:.2f}' for s in secs)}), "
        f"RSS median {statistics.median(rss):.0f} MB, torch loaded: {runs[0][2]}"
    )


if __name__ == "__main__":
    main()
