"""How `epdserve up` keeps its children running: restart a dead one after an exponential
backoff, and give up (stop the cluster) only on a crash loop.

Like a Kubernetes restartPolicy Always with CrashLoopBackOff, but a loop ends the cluster:
on one machine a child that keeps dying usually means a broken setup (a port taken, a model
that does not load), and the user should see its last output rather than a cluster that
limps. ``RestartPolicy`` and ``RestartHistory`` are pure Python (no processes, no clock of
their own); ``Supervisor`` applies them to the children on each ``poll()`` of the caller's
loop, with no threads.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


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

    def __post_init__(self) -> None:
        if self.restart_backoff_s <= 0 or self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError("need 0 < --restart-backoff-s <= --restart-backoff-max-s")
        if self.restart_reset_s <= 0 or self.restart_window_s <= 0:
            raise ValueError("--restart-reset-s and --restart-window-s must be > 0")
        if self.max_restarts < 0:
            raise ValueError("--max-restarts must be >= 0")


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


class Supervisor:
    """Restarts dead children by ``policy``; ``poll()`` says when to give up."""

    def __init__(
        self,
        children: Sequence[Child],
        policy: RestartPolicy,
        say: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._say = say
        self._clock = clock
        now = clock()
        self._slots = [_Slot(c, RestartHistory(policy), now, ready_line=c.ready_line)
                       for c in children]  # fmt: skip

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
                try:
                    child.restart()
                except Exception as exc:  # counted as an exit on the next poll
                    self._say(f"{child.label} did not restart: {exc}")
        return None
