"""The state of one worker process: role, epoch, drain flag, requests in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc


class WorkerState:
    """Role, epoch, drain flag and in-flight requests of one worker process."""

    def __init__(self, instance_id: str, incarnation: str, role: str) -> None:
        self.instance_id = instance_id
        self.incarnation = incarnation
        self.role = role
        self.role_epoch = 1
        self.draining = False  # operator drain: refuse new work, stay in the cluster
        self.flipping = False  # a role change (or a sleep's drain) is under way
        self.asleep = False  # its engine sleeps, or is waking up (worker/sleep.py)
        self.loading = False  # draining for a restart with another model (worker/model_load.py)
        self.inflight: set[str] = set()
        # Requests aborted by a role change after the drain timeout -> the error to report.
        self.evicted: dict[str, str] = {}
        self.idle = asyncio.Event()  # set while nothing is in flight
        self.idle.set()
        # Called after role/drain changes so the etcd advertisement follows.
        self.on_change: Callable[[], None] = lambda: None

    @property
    def phase(self) -> str:
        """Advertised state: membership.WORKER_STATES."""
        if self.loading:
            return "loading"
        if self.asleep:
            return "sleeping"
        return "flipping" if self.flipping else "draining" if self.draining else "serving"

    def refusal(
        self, roles: tuple[str, ...], epoch: int, held: bool = False
    ) -> tuple[grpc.StatusCode, str] | None:
        """Why this worker must not take a call now (status and message), or None: a stale
        epoch, draining or mid-flip, the wrong role. ``held``: the call continues work already
        taken (a decode reservation), which a flip lets finish."""
        if epoch and epoch != self.role_epoch:
            # NOTE: routers match this prefix; the request never ran here, so re-route it.
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale role epoch {epoch}; worker {self.instance_id} is at {self.role_epoch} "
                f"(role {self.role})",
            )
        if self.draining:
            return grpc.StatusCode.UNAVAILABLE, f"worker {self.instance_id} is draining"
        if self.asleep:
            return grpc.StatusCode.UNAVAILABLE, f"worker {self.instance_id} is asleep"
        if self.flipping and not held:
            return grpc.StatusCode.UNAVAILABLE, f"worker {self.instance_id} is changing role"
        if self.role not in roles:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {self.instance_id} has role {self.role!r}; this call needs "
                f"{' or '.join(roles)}",
            )
        return None
