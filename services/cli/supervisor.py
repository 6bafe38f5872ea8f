"""How `epdserve up` keeps its children running: restart a dead one after an exponential
backoff, and give up (stop the cluster) only on a crash loop.

Like a Kubernetes restartPolicy Always with CrashLoopBackOff, but a loop ends the cluster:
on one machine a child that keeps dying usually means a broken setup (a port taken, a model
that does not load), and the user should see its last output rather than a cluster that
limps. Like a liveness probe too: a child that is alive but does not answer (stopped with
SIGSTOP, its event loop stuck) is killed after ``liveness_failures`` probes in a row and
restarted as a dead one would be (routers over HTTP, workers over the gRPC health service;
see ``Child.probe``). ``RestartPolicy`` and ``RestartHistory`` are pure Python (no processes,
no clock of their own); ``Supervisor`` applies them to the children on each ``poll()`` of the
caller's loop. Probes run on a few threads of their own: a child that accepts a connection and
never answers holds a probe for its whole timeout, and the loop must notice other children's
exits (and Ctrl-C) meanwhile.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

# Liveness period and timeout bounds: a local probe takes milliseconds; a day is no probe.
MIN_LIVENESS_S = 0.1
MAX_LIVENESS_S = 86400.0
# How late `up`'s loop may notice a finished probe (it polls every 0.5 s).
POLL_SLACK_S = 0.5


@dataclass
class RestartPolicy:
    """When a dead child is started again, and when restarting is given up."""

    restart_backoff_s: float = field(
        default=1.0,
        metadata={"help": "wait before restarting a dead process; doubles on each restart"},
    )
    restart_backoff_max_s: float = field(
        default=30.0, metadata={"help": "longest wait before a restart"}
    )
    restart_reset_s: float = field(
        default=60.0,
        metadata={"help": "a process that ran this long before dying starts its backoff over"},
    )
    max_restarts: int = field(
        default=5,
        metadata={
            "help": "stop the cluster when one process dies more than this many times within "
            "--restart-window-s (a crash loop); 0: never restart"
        },
    )
    restart_window_s: float = field(
        default=300.0, metadata={"help": "the window of --max-restarts, in seconds"}
    )
    liveness_period_s: float = field(
        default=5.0,
        metadata={"help": "seconds between liveness probes of each router (an HTTP request "
                          "any answer passes) and worker (gRPC health Check); 0: no probes"},
    )  # fmt: skip
    liveness_timeout_s: float = field(
        default=2.0, metadata={"help": "a liveness probe not answered this fast fails"}
    )
    liveness_failures: int = field(
        default=6,
        metadata={
            "help": "kill and restart a router or worker after this many failed probes in a row"
        },
    )

    def __post_init__(self) -> None:
        if self.restart_backoff_s <= 0 or self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError("need 0 < --restart-backoff-s <= --restart-backoff-max-s")
        if self.restart_reset_s <= 0 or self.restart_window_s <= 0:
            raise ValueError("--restart-reset-s and --restart-window-s must be > 0")
        if self.max_restarts < 0:
            raise ValueError("--max-restarts must be >= 0")
        # NOTE: 'not >=' also refuses NaN. A timeout nothing can answer within (1e-300 s) failed
        # every probe: each router and worker was killed in turn until the crash loop
        # stopped the cluster; a period of inf meant no probes but read as a setting.
        period, timeout = self.liveness_period_s, self.liveness_timeout_s
        if not (period == 0 or MIN_LIVENESS_S <= period <= MAX_LIVENESS_S):
            raise ValueError(f"--liveness-period-s must be 0 (no probes) or in "
                             f"[{MIN_LIVENESS_S:g}, {MAX_LIVENESS_S:g}]")  # fmt: skip
        if not MIN_LIVENESS_S <= timeout <= MAX_LIVENESS_S:
            raise ValueError(f"--liveness-timeout-s must be in [{MIN_LIVENESS_S:g}, "
                             f"{MAX_LIVENESS_S:g}]")  # fmt: skip
        if not 1 <= self.liveness_failures <= 1000:
            raise ValueError("--liveness-failures must be in [1, 1000]")

    @property
    def detection_s(self) -> float:
        """The longest a child that stops answering (SIGSTOP, a stuck loop) lives before its
        probes kill it: ``liveness_failures`` probes, each started up to a period after the
        last one ended and failing after the timeout, plus a poll of the caller's loop each
        (0: no probes, such a child is never killed)."""
        p = self.liveness_period_s
        if not p:
            return 0.0
        return self.liveness_failures * (p + self.liveness_timeout_s + POLL_SLACK_S)


class RestartHistory:
    """One child's exits, and what each means: restart after a delay, or give up."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.restarts = 0  # restarts granted so far (the n of "restart n")
        self._exits: collections.deque[float] = collections.deque()  # inside the window
        self._next_delay = policy.restart_backoff_s

    def on_exit(self, started_at: float, exited_at: float) -> float | None:
        """Seconds to wait before the restart, or None: a crash loop, give up."""
        p = self.policy
        if exited_at - started_at >= p.restart_reset_s:
            self._next_delay = p.restart_backoff_s  # it had been healthy: not a loop
        self._exits.append(exited_at)
        while exited_at - self._exits[0] > p.restart_window_s:
            self._exits.popleft()
        if len(self._exits) > p.max_restarts:
            return None
        delay = self._next_delay
        self._next_delay = min(delay * 2, p.restart_backoff_max_s)
        self.restarts += 1
        return delay

    @property
    def recent_exits(self) -> int:
        """Exits inside the window (as of the last one)."""
        return len(self._exits)


class Child(Protocol):
    """A supervised process (``ManagedProcess``, or the launcher's etcd adapter)."""

    name: str
    ready_line: str | None  # the latest ready line it printed (None: none yet, or never)

    @property
    def label(self) -> str: ...  # how messages name it

    def alive(self) -> bool: ...

    def is_ready(self) -> bool: ...  # started and said so (its ready line, etcd's health)

    def returncode(self) -> int | None: ...  # of the last exit (None: never started)

    def restart(self) -> None: ...  # same command, same instance id

    def kill(self) -> None: ...  # SIGKILL (a stopped process dies too)

    def probe(self, timeout: float) -> bool | None:
        """Whether the child answered a liveness probe within ``timeout``; None: not probed
        (it has no probe, or has not said it is ready: a start-up is never cut short)."""
        ...

    def last_output(self, lines: int = 40) -> str: ...


def describe_exit(returncode: int | None) -> str:
    """'signal 9', 'exit code 1', or 'did not start' (Popen's return code, in words)."""
    if returncode is None:
        return "did not start"
    if returncode < 0:
        return f"signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class _Slot:
    child: Child
    history: RestartHistory
    started_at: float
    restart_at: float | None = None  # dead and waiting for its backoff
    restarted: bool = False  # restarted, not yet ready again
    ready_line: str | None = None  # the child's ready line as last seen
    probe_at: float = 0.0  # next liveness probe
    probes_failed: int = 0  # in a row
    probing: Future[bool | None] | None = None  # the probe in flight


class Supervisor:
    """Restarts dead children by ``policy``; ``poll()`` says when to give up."""

    def __init__(
        self,
        children: Sequence[Child],
        policy: RestartPolicy,
        say: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        probes: Executor | None = None,
    ) -> None:
        """``probes``: where liveness probes run (default: a thread per child at most)."""
        self.policy = policy
        self._say = say
        self._clock = clock
        now = clock()
        self._slots = [_Slot(c, RestartHistory(policy), now, ready_line=c.ready_line)
                       for c in children]  # fmt: skip
        # NOTE: each probe ends within its timeout, so at most one thread per child is busy.
        self._probes = probes or ThreadPoolExecutor(max(1, len(self._slots)), "liveness-probe")

    def close(self) -> None:
        """Stop probing (probes in flight end within their timeout)."""
        self._probes.shutdown(wait=False, cancel_futures=True)

    def poll(self) -> str | None:
        """Notice exits, start what is due; returns why the cluster must stop (a crash
        loop: which process, how it exited, its last output), else None."""
        now = self._clock()
        for slot in self._slots:
            child = slot.child
            if slot.restart_at is None:
                if child.alive():
                    line = child.ready_line
                    if line != slot.ready_line and line is not None:
                        if slot.ready_line is not None and not slot.restarted:
                            # Same process, new image: a worker loaded another model.
                            self._say(f"{child.label} restarted in place: {line}")
                        slot.ready_line = line
                    if slot.restarted and child.is_ready():
                        slot.restarted = False
                        self._say(
                            f"{child.label} is back ({now - slot.started_at:.0f} s after its restart)"
                        )
                    self._probe(slot, now)
                    continue
                slot.restarted = False
                delay = slot.history.on_exit(slot.started_at, now)
                how = describe_exit(child.returncode())
                if delay is None:
                    return (
                        f"{child.label} exited ({how}) {slot.history.recent_exits} times within "
                        f"{self.policy.restart_window_s:g} s: a crash loop, giving up; its last "
                        f"output:\n{child.last_output()}"
                    )
                self._say(
                    f"{child.label} exited ({how}); restarting in {delay:.1f} s "
                    f"(restart {slot.history.restarts})"
                )
                slot.restart_at = now + delay
            elif now >= slot.restart_at:
                slot.restart_at = None
                slot.started_at = now
                slot.restarted = True
                slot.probes_failed = 0
                slot.probing = None  # a probe of the old process says nothing of the new one
                try:
                    child.restart()
                except Exception as exc:  # counted as an exit on the next poll
                    self._say(f"{child.label} did not restart: {exc}")
        return None

    def _probe(self, slot: _Slot, now: float) -> None:
        """Start a probe of a live child when its period is due, and judge the one that
        finished; kill the child after too many failures in a row (the next poll restarts
        it: it counts as an exit, crash loops included)."""
        p = self.policy
        if slot.probing is not None:
            if not slot.probing.done():
                return
            answered = slot.probing.result() if not slot.probing.cancelled() else None
            slot.probing = None
            self._judge(slot, answered)
            return
        if not p.liveness_period_s or now < slot.probe_at:
            return
        slot.probe_at = now + p.liveness_period_s
        try:
            slot.probing = self._probes.submit(self._run_probe, slot.child, p.liveness_timeout_s)
        except RuntimeError:  # closed: the cluster is stopping
            slot.probing = None
            return
        if slot.probing.done():  # answered at once: judged now rather than on the next poll
            self._probe(slot, now)

    @staticmethod
    def _run_probe(child: Child, timeout: float) -> bool | None:
        try:
            return child.probe(timeout)
        except Exception:  # noqa: BLE001 - a probe that breaks says nothing about the child
            return None

    def _judge(self, slot: _Slot, answered: bool | None) -> None:
        p = self.policy
        if answered is not False or not slot.child.alive():
            slot.probes_failed = 0
            return
        slot.probes_failed += 1
        if slot.probes_failed >= p.liveness_failures:
            slot.probes_failed = 0
            self._say(
                f"{slot.child.label} did not answer {p.liveness_failures} liveness probes in a "
                f"row ({p.liveness_period_s:g} s apart, {p.liveness_timeout_s:g} s each): killing it"
            )
            slot.child.kill()
