"""Leader election among router replicas through one leased etcd key.

The key (``/epdserve/<cluster>/rebalancer/leader``) is created only if absent (a transaction
on its create revision), under a lease this router keeps alive. Whoever holds it is the
leader; when that router dies the lease expires and another one takes the key. After losing
etcd for longer than the TTL a leader steps down by itself (``is_leader`` goes false), so two
routers never both believe they lead for longer than one TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time

from etcd3aio import Etcd3Client

from services.common.aio import cancel_and_wait
from services.common.etcd_client import ETCD_OP_TIMEOUT_S
from services.common.lease_keeper import keep_alive_once
from services.common.leased_loop import run_leased

log = logging.getLogger(__name__)


def leader_key(cluster: str) -> str:
    return f"/epdserve/{cluster}/rebalancer/leader"


class LeaderElection:
    def __init__(self, endpoints: list[str], cluster: str, identity: str, ttl: int = 5) -> None:
        if ttl < 2:
            raise ValueError("leader lease ttl must be >= 2 seconds")
        self.endpoints = endpoints
        self.key = leader_key(cluster)
        self.identity = identity
        self.ttl = ttl
        self.is_leader = False
        self.leader: str | None = None  # identity of the current leader, as last read
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rebalancer-election")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self.is_leader = False

    async def _run(self) -> None:
        await run_leased(self.endpoints, self.ttl, self._campaign, "rebalancer election")

    async def _campaign(self, c: Etcd3Client, lease_id: int) -> None:
        """Try to take the key; keep the lease alive; return (to start over) on any loss."""
        try:
            await self._hold(c, lease_id)
        finally:
            if self.is_leader:
                log.info("no longer the rebalancer leader")
            self.is_leader = False

    async def _hold(self, c: Etcd3Client, lease_id: int) -> None:
        assert c.kv is not None and c.lease is not None
        interval = max(0.5, self.ttl / 3)
        last_ok = time.monotonic()
        while True:
            if not self.is_leader:
                resp = await c.kv.txn(
                    compare=[c.kv.txn_compare_create_revision(self.key, 0)],
                    success=[c.kv.txn_op_put(self.key, self.identity, lease=lease_id)],
                    timeout=ETCD_OP_TIMEOUT_S,
                )
                if resp.succeeded:
                    self.is_leader = True
                    log.info("this router (%s) now runs the rebalancer", self.identity)
            got = await c.kv.get(self.key, timeout=ETCD_OP_TIMEOUT_S)
            self.leader = got.kvs[0].value.decode() if got.kvs else None
            if self.is_leader and self.leader != self.identity:
                raise RuntimeError("leader key lost (etcd restored or wiped?)")
            await asyncio.sleep(interval)
            try:
                ttl = await asyncio.wait_for(keep_alive_once(c, lease_id), ETCD_OP_TIMEOUT_S)
            except Exception as exc:
                if time.monotonic() - last_ok > self.ttl:
                    raise RuntimeError(f"leader lease lost: {exc}") from exc
                continue
            if ttl <= 0:
                raise RuntimeError("leader lease expired")
            last_ok = time.monotonic()
