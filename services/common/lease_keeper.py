"""Keeps an etcd lease alive from a thread of its own, so that a busy event loop cannot
starve it.

Why: the Registrar refreshed its lease on the process's main asyncio loop every ttl/3. A
worker's loop also runs gRPC handlers and calls that block it (llguidance's first grammar
build stalled it 1.5-1.8 s at a time, a long synchronous call longer), so with a 3 s TTL on
a loaded machine two refreshes were missed and a healthy worker left membership. Here the
refresh runs on an event loop of its own in a daemon thread with its own etcd client (a
grpc.aio channel belongs to the loop that made it). A loop that is busy or blocked no
longer matters; only something holding the GIL for a whole TTL still does.

Bounded: the keeper refreshes only while its owner's loop shows signs of life
(``owner_tick`` returns when that loop last ran) within ``stall_limit_s``. A loop stuck for
longer lets the lease lapse, so a process that cannot serve still leaves membership, later
than before. Every etcd call has ``ETCD_OP_TIMEOUT_S``; ``stop`` returns at once, and a
stopped keeper refreshes nothing more (at most one refresh already sent lands).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from etcd3aio import Etcd3Client

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, connect_etcd

log = logging.getLogger(__name__)

LOST, RESUMED = "lost", "resumed"  # what the keeper tells its owner


def default_stall_limit(ttl: float) -> float:
    """How long an owner's loop may go silent before its lease is let go: far above any
    stall seen from a busy loop (seconds), far below a hang nobody would notice."""
    return max(30.0, 6.0 * ttl)


class LeaseKeeper:
    """Refreshes one lease every ``interval`` seconds in a thread. ``on_event(kind,
    detail)`` is called from that thread: LOST when the lease expired, refreshing failed for
    longer than the TTL, or the owner's loop stalled past ``stall_limit_s`` (the keeper then
    ends); RESUMED after a gap of more than two intervals with the lease alive (the owner
    checks its key is still there)."""

    def __init__(
        self,
        endpoints: list[str],
        lease_id: int,
        ttl: float,
        owner_tick: Callable[[], float],
        on_event: Callable[[str, str], None],
        stall_limit_s: float | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.lease_id = lease_id
        self.ttl = ttl
        self.interval = max(0.5, ttl / 3)
        self.stall_limit_s = default_stall_limit(ttl) if stall_limit_s is None else stall_limit_s
        self.refreshes = 0  # successful refreshes (tests read it)
        self._owner_tick = owner_tick
        self._on_event = on_event
        self._stopped = threading.Event()
        self._client: Etcd3Client | None = None  # the thread's, made on its first refresh
        self._thread = threading.Thread(target=self._main, name="etcd-lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; returns at once (it ends within one etcd call's timeout)."""
        self._stopped.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _main(self) -> None:
        # NOTE: the thread's event loop runs only while it refreshes; in between the thread
        # waits on ``_stopped``. grpc.aio (1.85) wakes every running loop of the process that
        # has made a channel on each completion of any of them (one shared wake-up socket;
        # the loop that reads the byte hands the others' events over): a keeper loop idling
        # between refreshes was woken by every message of the owner's own RPCs, 1-2.4 times a
        # request of a worker (benchmarks/RESULTS.md, gw14).
        try:
            with asyncio.Runner() as runner:
                try:
                    self._keep(runner)
                finally:
                    runner.run(_closed(self._client))
        except Exception:  # noqa: BLE001 - a thread's exception would only be printed
            log.exception("lease keeper failed")
            self._tell(LOST, "the lease keeper failed")

    def _tell(self, kind: str, detail: str) -> None:
        if not self._stopped.is_set():
            self._on_event(kind, detail)

    async def _refresh(self) -> int:
        """One keep-alive on the thread's client (connected first if it has none): the TTL."""
        if self._client is None:
            self._client = await asyncio.wait_for(connect_etcd(self.endpoints), ETCD_OP_TIMEOUT_S)
        return await asyncio.wait_for(
            keep_alive_once(self._client, self.lease_id), ETCD_OP_TIMEOUT_S
        )

    def _keep(self, runner: asyncio.Runner) -> None:
        last_ok = time.monotonic()
        while not self._stopped.wait(self.interval):
            now = time.monotonic()
            silent = now - self._owner_tick()
            if silent > self.stall_limit_s:
                log.error("event loop silent for %.0f s: letting lease %x lapse", silent,
                          self.lease_id)  # fmt: skip
                self._tell(LOST, f"event loop silent for {silent:.0f} s")
                return
            try:
                ttl = runner.run(self._refresh())
            except Exception as exc:  # noqa: BLE001 - any etcd trouble: a fresh client
                runner.run(_closed(self._client))
                self._client = None
                if time.monotonic() - last_ok > self.ttl:
                    self._tell(LOST, f"lease keep-alive failing for > ttl: {exc!r}")
                    return
                continue
            if ttl <= 0:
                self._tell(LOST, "lease expired")
                return
            self.refreshes += 1
            now = time.monotonic()
            if now - last_ok > self.interval * 2:
                self._tell(RESUMED, f"no refresh for {now - last_ok:.1f} s")
            last_ok = now


async def _closed(client: Etcd3Client | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), ETCD_OP_TIMEOUT_S)


async def keep_alive_once(c: Etcd3Client, lease_id: int) -> int:
    """Refresh a lease once; returns its TTL (0 or less: it expired)."""
    assert c.lease is not None
    call = c.lease.keep_alive(lease_id)
    try:
        async for resp in call:
            return int(resp.TTL)
        raise RuntimeError("keep-alive stream closed")
    finally:
        call.cancel()
