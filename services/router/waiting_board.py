"""Requests waiting at each router for a sleeping model, shared through etcd, so that the one
router that swaps models (the election's leader, ``model_swap.py``) sees every router's.

Each router keeps ``/epdserve/<cluster>/waiting/<router identity>`` under a lease of its own,
holding ``{base model: requests waiting for it here}``: written when the counts change, kept
alive while they do not, gone when the router dies (its lease expires) or stops (revoked).
A router that is asked (``read`` set, the leader) lists the prefix each tick. With etcd away
the counts read last are dropped after one lease TTL: a dead router's must not keep a model
awake or asleep for ever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator

from etcd3aio import Etcd3Client, prefix_range_end

from services.common.aio import cancel_and_wait
from services.common.etcd_client import ETCD_OP_TIMEOUT_S
from services.common.lease_keeper import keep_alive_once
from services.common.leased_loop import run_leased

log = logging.getLogger(__name__)


def waiting_prefix(cluster: str) -> str:
    return f"/epdserve/{cluster}/waiting/"


def parse_counts(value: bytes) -> dict[str, int]:
    """A router's published counts; {} for a value this version cannot read (another
    version's, a hand-written key): it must not stop the leader from reading the others."""
    try:
        doc = json.loads(value)
        return {str(m): int(n) for m, n in doc.items() if int(n) > 0}
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("waiting counts %r unreadable (%r): ignored", value[:80], exc)
        return {}


class WaitingBoard:
    """This router's waiting requests per base model, published; every router's, read."""

    def __init__(
        self, endpoints: list[str], cluster: str, identity: str, read: Callable[[], bool],
        ttl: int = 5, tick_s: float = 0.25,
    ) -> None:  # fmt: skip
        if ttl < 2:
            raise ValueError("waiting board lease ttl must be >= 2 seconds")
        self.endpoints = endpoints
        self.prefix = waiting_prefix(cluster)
        self.key = self.prefix + identity
        self.read = read  # list the other routers' counts this tick (the leader does)
        self.ttl = ttl
        self.tick_s = tick_s
        self.local: collections.Counter[str] = collections.Counter()
        # Every router's counts as last listed (this one's included), and when.
        self._listed: dict[str, int] = {}
        self._listed_at = -float("inf")
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def waiting(self, model: str) -> Iterator[None]:
        """Count one request waiting here for ``model`` while the block runs."""
        self.local[model] += 1
        try:
            yield
        finally:
            self.local[model] -= 1
            if self.local[model] <= 0:
                del self.local[model]

    def cluster_waiting(self) -> dict[str, int]:
        """Requests waiting per base model at every router: this router's now, the others'
        as last listed (none after a TTL without a listing)."""
        listed = self._listed if time.monotonic() - self._listed_at <= self.ttl else {}
        out = collections.Counter(listed)
        out.update(self.local)
        return {m: n for m, n in out.items() if n > 0}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="waiting-board")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        await run_leased(self.endpoints, self.ttl, self._publish, "waiting board", logging.DEBUG)

    async def _publish(self, c: Etcd3Client, lease_id: int) -> None:
        """Each tick: write this router's counts if they changed, list every router's when
        asked, refresh the lease every third of its TTL; return (to start over) on a loss."""
        assert c.kv is not None
        written: dict[str, int] | None = None
        refreshed = time.monotonic()
        while True:
            now = dict(self.local)
            if now != written:
                value = json.dumps(now, sort_keys=True).encode()
                await c.kv.put(self.key, value, lease=lease_id, timeout=ETCD_OP_TIMEOUT_S)
                written = now
            if self.read():
                await self._list(c)
            if time.monotonic() - refreshed >= self.ttl / 3:
                ttl = await asyncio.wait_for(keep_alive_once(c, lease_id), ETCD_OP_TIMEOUT_S)
                if ttl <= 0:
                    raise RuntimeError("waiting board lease expired")
                refreshed = time.monotonic()
            await asyncio.sleep(self.tick_s)

    async def _list(self, c: Etcd3Client) -> None:
        assert c.kv is not None
        start = self.prefix.encode()
        resp = await c.kv.get(start, range_end=prefix_range_end(start), timeout=ETCD_OP_TIMEOUT_S)
        listed: collections.Counter[str] = collections.Counter()
        for kv in resp.kvs:
            if kv.key.decode() != self.key:  # this router's own: ``local`` is newer
                listed.update(parse_counts(kv.value))
        self._listed, self._listed_at = dict(listed), time.monotonic()
