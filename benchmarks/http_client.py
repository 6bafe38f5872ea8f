"""What the gateway benchmarks share: a bare keep-alive HTTP/1.1 client (so that a client
library's own CPU is not counted as the gateway's), percentiles, and the CPU time of a
process's threads around each timed call (gateway_overhead.py, worker_mux.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def emit(report: dict[str, Any], path: Path | None) -> None:
    """Print ``report`` as JSON, and write it to ``path`` too when one is given."""
    text = json.dumps(report, indent=2)
    print(text)
    if path is not None:
        path.write_text(text + "\n")


def cpu_s(pid: int) -> float:
    """On-CPU seconds of every thread of ``pid`` so far (schedstat: ns precision)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # a thread that ended meanwhile
            pass
    return total / 1e9


class RawClient:
    """POST ``body`` to ``path`` over one keep-alive connection, written and read by hand
    (a Content-Length or a chunked answer, e.g. an SSE stream)."""

    def __init__(self, url: str, body: dict[str, Any], path: str = "/v1/completions") -> None:
        self.parts = urlsplit(url)
        data = json.dumps(body)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.wire = head.encode() + data.encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.parts.hostname, self.parts.port
        )

    async def one(self) -> None:
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.wire)
        status = await asyncio.wait_for(self.reader.readline(), 60)
        length, chunked = None, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            if name.strip().lower() == b"transfer-encoding" and b"chunked" in value:
                chunked = True
        if length is not None:
            await self.reader.readexactly(length)
        elif chunked:
            while size := int((await self.reader.readline()).strip(), 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readexactly(2)
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP {status!r}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Meter:
    """Wall time of each call of each variant, and the CPU time its processes (``pids``:
    variant -> {name: pid}) spent during it, summed per variant. Alternate the variants call
    by call (or round by round) so that other load falls on all of them alike."""

    def __init__(self, pids: dict[str, dict[str, int]]) -> None:
        self.pids = pids
        self.wall: dict[str, list[float]] = {k: [] for k in pids}
        self.cpu: dict[str, dict[str, float]] = {k: dict.fromkeys(v, 0.0) for k, v in pids.items()}

    async def run(self, variant: str, call: Callable[[], Awaitable[Any]], keep: bool = True):
        """Time one ``call`` (``keep`` False: a warm-up, not recorded)."""
        pids = self.pids[variant]
        before = {name: cpu_s(pid) for name, pid in pids.items()}
        t = time.perf_counter()
        await call()
        elapsed = time.perf_counter() - t
        if keep:
            self.wall[variant].append(elapsed)
            for name, pid in pids.items():
                self.cpu[variant][name] += cpu_s(pid) - before[name]

    def cpu_ms(self, variant: str, per: int) -> dict[str, float]:
        """``{name}_cpu_ms``: each process's CPU a unit (``per`` units in the variant)."""
        return {f"{k}_cpu_ms": round(v * 1e3 / per, 3) for k, v in self.cpu[variant].items()}


def start_router(
    argv: list[str], flag: str, env: dict[str, str], tree: str | None = None
) -> tuple[str, subprocess.Popen]:
    """One more router as ``argv`` (a cluster's router_argv) starts one, on a free port, with
    ``flag`` added (e.g. --worker-mux; "" adds none); returns its URL and process. ``tree``:
    the router runs the code of that checkout (a git worktree of another commit) instead."""
    mux_flags = ("--worker-mux", "--no-worker-mux")
    args = [a for a in argv[argv.index("-m") :] if a not in mux_flags]
    args[args.index("--port") + 1] = "0"
    if tree is not None:  # ``-m`` imports from the working directory first
        env = {**env, "PYTHONPATH": tree + os.pathsep + env.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, *args, *filter(None, [flag])], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=tree)  # fmt: skip
    assert proc.stdout is not None
    while "READY" not in (line := proc.stdout.readline()):
        if not line:
            raise RuntimeError(f"router {flag} ended before it was ready")
    return line.split("url=")[1].strip(), proc
