"""Runs `mooncake_master` as a child process and restarts it when it dies or stops answering.

The master holds Mooncake Store's metadata; its restart loses every stored object (the
store is a cache). The supervisor keeps the same ports across restarts so that workers'
store clients reconnect to the same address (Mooncake's client re-mounts its segment on a
new master by itself), and tells its owner about each restart so the global index drops the
STORE tier it can no longer vouch for.

A master that is alive but does not answer (SIGSTOP, a deadlock) is found by an HTTP probe
of its health endpoint, not by a TCP connect: the kernel completes the handshake for a
stopped process. After ``PROBE_FAILURES`` unanswered probes in a row it is killed, and the
restart path above takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common.aio import cancel_and_wait
from services.common.parent_death import with_parent_death

log = logging.getLogger(__name__)

# How long a fresh master may take to accept connections before it counts as failed.
START_TIMEOUT_S = 20.0
# Liveness of a running master: a probe every PROBE_PERIOD_S, failed when not answered
# within PROBE_TIMEOUT_S; PROBE_FAILURES in a row kill it. A local answer takes
# milliseconds, so three 3 s misses are no slow master even at a load of 25; a false kill
# would only empty the cache.
PROBE_PERIOD_S = 2.0
PROBE_TIMEOUT_S = 3.0
PROBE_FAILURES = 3


def find_master_binary(name: str = "mooncake_master") -> str:
    """The master from the Mooncake wheel: this venv's console script first, then PATH."""
    if "/" in name:
        return name
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"{name} not found: install the Mooncake wheel "
        "(pip install mooncake-transfer-engine-non-cuda, or the CUDA build)"
    )


@dataclass(frozen=True)
class MasterPorts:
    host: str  # bind and advertised address of every listener
    rpc_port: int
    metadata_port: int  # HTTP metadata server (replaces etcd for Mooncake's segments)
    metrics_port: int

    @property
    def rpc_address(self) -> str:
        return f"{self.host}:{self.rpc_port}"

    @property
    def metadata_url(self) -> str:
        return f"http://{self.host}:{self.metadata_port}/metadata"


def master_argv(
    binary: str, ports: MasterPorts, kv_lease_ttl_ms: int, extra: list[str]
) -> list[str]:
    """argv of the master; ``extra`` flags may come without their leading dashes. NOTE:
    every host is passed explicitly; the master's defaults are 0.0.0.0."""
    return [
        binary,
        f"--rpc_address={ports.host}",
        f"--rpc_port={ports.rpc_port}",
        "--enable_http_metadata_server=true",
        f"--http_metadata_server_host={ports.host}",
        f"--http_metadata_server_port={ports.metadata_port}",
        f"--metrics_host={ports.host}",
        f"--metrics_port={ports.metrics_port}",
        f"--default_kv_lease_ttl={kv_lease_ttl_ms}",
        *(f"--{flag.lstrip('-')}" for flag in extra),
    ]


async def spawn(argv: list[str]) -> asyncio.subprocess.Process:
    """Start ``argv`` (a master) so that it gets SIGTERM when this process dies, even by
    SIGKILL: a master never outlives its kvstore (Linux; parent_death.py).

    NOTE: not a ``preexec_fn`` setting PR_SET_PDEATHSIG: that makes Python fork() and run
    gRPC's at-fork handlers in the child, which aborted 1 master start in 10-30 (SIGABRT,
    "epoll_wait error: Bad file descriptor") once the kvstore's gRPC server and etcd client
    ran, as it did `up`'s children (52960d9)."""
    return await asyncio.create_subprocess_exec(
        *with_parent_death(argv), stdin=asyncio.subprocess.DEVNULL, stdout=sys.stderr,
        stderr=sys.stderr,
    )  # fmt: skip


async def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def http_answers(host: str, port: int, path: str, timeout: float) -> bool:
    """Whether an HTTP server answers ``GET path`` with a status line within ``timeout``
    (any status passes: the process is serving). Raw HTTP/1.0 on a socket: no proxy, no
    thread, and a stopped peer costs only the timeout."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            line = await reader.readline()
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
    return line.startswith(b"HTTP/")


class MasterSupervisor:
    """Keeps one `mooncake_master` running. ``on_restart`` is called (on the event loop)
    each time a new master process replaces one that died."""

    def __init__(
        self,
        argv: list[str],
        ports: MasterPorts,
        on_restart: Callable[[], None] | None = None,
        max_backoff_s: float = 5.0,
        probe_period_s: float = PROBE_PERIOD_S,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        probe_failures: int = PROBE_FAILURES,
    ) -> None:
        self.argv = argv
        self.ports = ports
        self.on_restart = on_restart
        self.restarts = 0
        self.ready = asyncio.Event()  # set while a started master accepts connections
        self.proc: asyncio.subprocess.Process | None = None
        self._max_backoff_s = max_backoff_s
        self._probe = (probe_period_s, probe_timeout_s, probe_failures)
        self.probe_kills = 0  # masters killed for not answering (tests and logs read it)
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.ready.is_set() and self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start supervising; returns once the first master accepts connections."""
        self._task = asyncio.create_task(self._run(), name="mooncake-master")
        ready = asyncio.create_task(self.ready.wait())
        done, _ = await asyncio.wait(
            {ready, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if ready not in done:
            ready.cancel()
            await self.stop()
            raise RuntimeError(f"mooncake_master did not start within {timeout:.0f}s")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self._terminate()

    async def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        self.ready.clear()
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=5.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def _run(self) -> None:
        backoff = 0.2
        started_once = False
        try:
            while True:
                ok = await self._start_one()
                if ok:
                    if started_once:
                        self.restarts += 1
                        log.warning("mooncake_master restarted (pid %s): store is empty", self.pid)
                        if self.on_restart is not None:
                            self.on_restart()
                    started_once = True
                    backoff = 0.2
                    code = await self._watch()
                    self.ready.clear()
                    log.error("mooncake_master exited with %s; restarting", code)
                else:
                    await self._terminate()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
        finally:
            await asyncio.shield(self._terminate())

    async def _watch(self) -> int:
        """Wait for the running master to exit, probing it meanwhile; one that stops
        answering is killed (SIGKILL works on a stopped process too). Its exit code."""
        proc = self.proc
        assert proc is not None
        period, timeout, limit = self._probe
        exited = asyncio.ensure_future(proc.wait())
        failed = 0
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=period)
                if done:
                    return exited.result()
                if await http_answers(self.ports.host, self.ports.metrics_port, "/health", timeout):
                    failed = 0
                    continue
                failed += 1
                if failed < limit or proc.returncode is not None:
                    continue
                log.error("mooncake_master (pid %s) did not answer %d health probes in a row "
                          "(%.0f s apart, %.0f s each): killing it", proc.pid, failed,
                          period, timeout)  # fmt: skip
                self.probe_kills += 1
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return await exited
        finally:
            exited.cancel()

    async def _start_one(self) -> bool:
        """Start a master and wait until its RPC port answers; False if it did not."""
        self.proc = await spawn(self.argv)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                log.error("mooncake_master exited at start with %s", self.proc.returncode)
                return False
            if await _port_open(self.ports.host, self.ports.rpc_port) and await _port_open(
                self.ports.host, self.ports.metadata_port
            ):
                self.ready.set()
                return True
            await asyncio.sleep(0.1)
        log.error("mooncake_master did not open its ports within %.0fs", START_TIMEOUT_S)
        return False
