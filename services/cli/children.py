"""The children a local cluster is made of: a process that says when it is ready, and etcd.

``ManagedProcess`` runs a command, keeps its last lines of output and scans them for the
child's ready line; ``EtcdChild`` lets the supervisor of `epdserve up` restart the cluster's
etcd like any other child (services/cli/supervisor.py).
"""

from __future__ import annotations

import collections
import os
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

from services.cli.child_log import ChildLog
from services.common.etcd_server import EtcdServer
from services.common.net import open_direct
from services.common.parent_death import with_parent_death

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ManagedProcess:
    """A child process whose output is kept (last lines) and scanned for a ready line."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        ready_prefix: str,
        echo: bool = False,
        extra_env: dict[str, str] | None = None,
        role: str | None = None,
        probe_path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        probe_grpc: bool = False,
        probe_stall: bool = False,
    ) -> None:
        """``probe_path``: the liveness probe, an HTTP path under the ``url`` of the ready
        line (a router's); ``ssl_context``: how to trust it over HTTPS. ``probe_grpc``: probe
        the gRPC health service at the ready line's ``address`` (a worker's); ``probe_stall``: ask
        it for the worker service, which fails the probe while the worker's engine is stuck too
        (services/worker/health.py)."""
        self.name = name
        self.label = f"{name} ({role})" if role else name  # how `up`'s messages name it
        self.argv = argv
        self.ready_prefix = ready_prefix
        self.ready_line: str | None = None
        self.ready = threading.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        env = dict(os.environ)
        # Children import `services` from this checkout even when started elsewhere.
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra_env or {})  # NOTE: secrets (etcd password) travel here, never in argv
        self._env = env
        self._echo = echo
        self.probe_path = probe_path
        self.ssl_context = ssl_context
        self.probe_grpc = probe_grpc
        self.probe_stall = probe_stall
        self._spawn()

    def _spawn(self) -> None:
        log = ChildLog()  # NOTE: not a pipe: a stopped `up` must not block its children
        try:
            self.proc = subprocess.Popen(
                with_parent_death(self.argv),  # SIGTERM when `up` is killed outright
                stdout=log.fd, stderr=subprocess.STDOUT, env=self._env,
                start_new_session=True,  # Ctrl-C reaches the launcher only
            )  # fmt: skip
        except BaseException:
            log.close()
            raise
        self._reader = threading.Thread(
            target=self._read, args=(self.proc, log), daemon=True, name=f"read-{self.name}"
        )
        self._reader.start()

    def restart(self) -> None:
        """Start the same command again (same argv: same instance id and ports; a worker
        draws a new incarnation). Only after the process exited."""
        assert not self.alive(), f"{self.name} is still running"
        self._reader.join(timeout=2.0)  # its last lines stay first in the tail
        self.ready_line = None
        self.ready.clear()
        self._spawn()
        # Marks where the new run's output starts (a crash loop shows this tail).
        self.tail.append(f"[epdserve: {self.name} restarted as pid {self.proc.pid}]")

    def _read(self, proc: subprocess.Popen, log: ChildLog) -> None:
        try:
            log.follow(proc, self._on_line)
        finally:
            log.close()

    def _on_line(self, line: str) -> None:
        self.tail.append(line)
        if self._echo:
            print(f"[{self.name}] {line}", file=sys.stderr, flush=True)
        # NOTE: the latest, not the first: a worker that restarts in place (a model load's
        # os.execv, same pid) says it again, with its new ports.
        if line.startswith(self.ready_prefix):
            self.ready_line = line
            self.ready.set()

    def ready_field(self, key: str) -> str:
        assert self.ready_line is not None
        for part in self.ready_line.split():
            if part.startswith(key + "="):
                return part[len(key) + 1 :]
        raise KeyError(key)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def returncode(self) -> int | None:
        return self.proc.returncode

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def signal(self, sig: int) -> None:
        """Signal the process if it still runs. NOTE: not ``alive()`` then ``os.kill``: the
        log thread's ``poll()`` may reap the process in between (a ``poll()`` that finds the
        wait lock taken answers "running"), and the kill then raised ProcessLookupError out
        of ``up``'s stop; ``send_signal`` ignores a process gone meanwhile."""
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def probe(self, timeout: float) -> bool | None:
        """GET ``probe_path``: any HTTP answer passes (a router with no worker answers 503:
        it is alive); no answer within ``timeout`` fails. None before the ready line. A gRPC
        probe (``probe_grpc``): see services/worker/health.py ``check``."""
        if not self.ready.is_set() or not self.alive():
            return None
        if self.probe_grpc:
            from services.worker.health import WORKER_SERVICE, check  # grpc: only `up` needs it

            service = WORKER_SERVICE if self.probe_stall else ""
            return check(self.ready_field("address"), timeout, service=service)
        if self.probe_path is None:
            return None
        url = self.ready_field("url") + self.probe_path
        try:
            with open_direct(url, timeout=timeout, context=self.ssl_context):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:  # refused, reset, timed out
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def last_output(self, lines: int = 40) -> str:
        return "\n".join(list(self.tail)[-lines:])

    def describe_failure(self) -> str:
        return f"{self.name} exited with {self.proc.returncode}; last output:\n" + (
            self.last_output()
        )


class EtcdChild:
    """The cluster's etcd as a supervised child: restarted on the same ports and data."""

    name = label = "etcd"
    ready_line: str | None = None  # it prints none (typed as Child says: mypy)

    def __init__(self, etcd: EtcdServer) -> None:
        self.etcd = etcd

    def alive(self) -> bool:
        return self.etcd.proc is not None and self.etcd.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.etcd.proc is None else self.etcd.proc.returncode

    def is_ready(self) -> bool:
        return self.alive()  # restart() returns once etcd is healthy

    def restart(self) -> None:
        self.etcd.start()  # waits until healthy; raises if it exits or times out

    def kill(self) -> None:
        if self.alive():
            assert self.etcd.proc is not None
            self.etcd.proc.kill()

    def probe(self, timeout: float) -> bool | None:
        """Not probed: while etcd does not answer, the routers serve from their last view."""
        return None

    def last_output(self, lines: int = 40) -> str:
        try:
            text = Path(self.etcd.log_path).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
