"""Stored responses of the Responses API (``store``, ``previous_response_id``, GET / DELETE,
background runs), shared by every router of a cluster through etcd.

A record is JSON: the response object and the chat turns of its conversation (what a later
``previous_response_id`` continues from). It lives under ``/epdserve/<cluster>/responses/<id>``
on a lease of ``ttl_s`` (one lease serves the puts of a tenth of the TTL, so a record lives
between 0.9 and 1 TTL and then disappears from etcd by itself).

Bounds: etcd holds records of at most ``max_record_bytes`` each and at most ``max_records`` of
them (counted at most every few seconds). A record over either bound, or one written while
etcd is away (for ETCD_PAUSE_S after a failed write, etcd is not tried), is kept in this
router's memory instead (an LRU of ``local_bytes``, same TTL):
only this router then finds it, and it is gone when the router restarts or the LRU needs the
room.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any

from etcd3aio import Etcd3Client, prefix_range_end

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, EtcdSession

log = logging.getLogger(__name__)

COUNT_EVERY_S = 5.0  # how stale the count of records in etcd may be
ETCD_PAUSE_S = 5.0  # after a failed write, records go straight to memory this long


def responses_prefix(cluster: str) -> str:
    return f"/epdserve/{cluster}/responses/"


class _Local:
    """Records this router keeps itself: an LRU bounded by bytes, each with an expiry."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.size = 0

    def put(self, rid: str, value: bytes, ttl_s: float) -> bool:
        self.pop(rid)
        if len(value) > self.max_bytes:
            return False
        self.items[rid] = (time.monotonic() + ttl_s, value)
        self.size += len(value)
        while self.size > self.max_bytes:
            _, (_, old) = self.items.popitem(last=False)
            self.size -= len(old)
        return True

    def get(self, rid: str) -> bytes | None:
        found = self.items.get(rid)
        if found is None:
            return None
        if found[0] < time.monotonic():
            self.pop(rid)
            return None
        self.items.move_to_end(rid)
        return found[1]

    def pop(self, rid: str) -> bool:
        found = self.items.pop(rid, None)
        if found is not None:
            self.size -= len(found[1])
        return found is not None


class ResponseStore:
    """Records by response id: in etcd when small and while there is room, else locally."""

    def __init__(self, endpoints: list[str], cluster: str, ttl_s: float,
                 max_record_bytes: int, max_records: int, local_bytes: int) -> None:  # fmt: skip
        self.session = EtcdSession(endpoints)
        self.prefix = responses_prefix(cluster)
        self.ttl_s = ttl_s
        self.max_record_bytes = max_record_bytes
        self.max_records = max_records
        self.local = _Local(local_bytes)
        self._lease: tuple[int, float] | None = None  # (id, monotonic time granted)
        self._count: tuple[int, float] = (0, -COUNT_EVERY_S)  # (records in etcd, when counted)
        self._etcd_paused_until = 0.0  # monotonic time

    async def put(self, rid: str, record: dict[str, Any]) -> None:
        """Store ``record`` (replacing any under ``rid``); never raises for etcd's sake, and
        after an etcd failure skips etcd for ETCD_PAUSE_S (a response waits for no outage)."""
        value = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        self.local.pop(rid)
        if time.monotonic() >= self._etcd_paused_until:
            try:
                if len(value) <= self.max_record_bytes and await self._put_etcd(rid, value):
                    return
                # NOTE: kept locally: no earlier, smaller state of it (a background run's
                # "queued") may stay in etcd for other routers to read.
                await self._delete_etcd(rid)
            except Exception as exc:  # noqa: BLE001 - etcd away: this router keeps it
                self._etcd_paused_until = time.monotonic() + ETCD_PAUSE_S
                log.warning("storing response %s in etcd failed (%s); kept locally", rid, exc)
        if not self.local.put(rid, value, self.ttl_s):
            log.warning("response %s (%d bytes) is larger than the local store", rid, len(value))

    async def get(self, rid: str) -> dict[str, Any] | None:
        """The record of ``rid``, or None (never stored, expired, deleted)."""
        value = self.local.get(rid)
        if value is None:

            async def get(c: Etcd3Client) -> bytes | None:
                assert c.kv is not None
                resp = await c.kv.get(self.prefix + rid, timeout=ETCD_OP_TIMEOUT_S)
                return resp.kvs[0].value if resp.kvs else None

            value = await self.session.call(get)
        return json.loads(value) if value is not None else None

    async def delete(self, rid: str) -> bool:
        """Whether a record of ``rid`` was there."""
        local = self.local.pop(rid)
        return await self._delete_etcd(rid) or local

    async def _delete_etcd(self, rid: str) -> bool:
        async def delete(c: Etcd3Client) -> int:
            assert c.kv is not None
            resp = await c.kv.delete(self.prefix + rid, timeout=ETCD_OP_TIMEOUT_S)
            return int(resp.deleted)

        return bool(await self.session.call(delete))

    async def close(self) -> None:
        await self.session.close()

    async def _put_etcd(self, rid: str, value: bytes) -> bool:
        """Put ``value`` under a lease; False when etcd holds ``max_records`` already."""

        async def put(c: Etcd3Client) -> bool:
            assert c.kv is not None and c.lease is not None
            now = time.monotonic()
            if now - self._count[1] >= COUNT_EVERY_S:
                resp = await c.kv.get(self.prefix, range_end=prefix_range_end(self.prefix.encode()),
                                      count_only=True, timeout=ETCD_OP_TIMEOUT_S)  # fmt: skip
                self._count = (int(resp.count), now)
            if self._count[0] >= self.max_records:
                return False
            if self._lease is None or now - self._lease[1] > self.ttl_s / 10:
                grant = await c.lease.grant(max(1, int(self.ttl_s)), timeout=ETCD_OP_TIMEOUT_S)
                self._lease = (grant.ID, now)
            await c.kv.put(self.prefix + rid, value, lease=self._lease[0],
                           timeout=ETCD_OP_TIMEOUT_S)  # fmt: skip
            self._count = (self._count[0] + 1, self._count[1])
            return True

        try:
            return await self.session.call(put)
        except Exception:
            self._lease = None  # granted on a client that failed: may be gone
            raise
