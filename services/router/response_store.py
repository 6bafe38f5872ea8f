"""Stored responses of the Responses API (``store``, ``previous_response_id``, GET / DELETE,
background runs), shared by every router of a cluster through etcd.

A record is JSON: the response object and the chat turns of its conversation (what a later
``previous_response_id`` continues from). It lives under ``/epdserve/<cluster>/responses/<id>``
on a lease of ``ttl_s`` (one lease serves the puts of a tenth of the TTL, so a record lives
between 0.9 and 1 TTL and then disappears from etcd by itself).

A record larger than ``max_record_bytes`` is a file ``<files_dir>/<id>.json`` (the batch
directory, a volume every router mounts) and its etcd key holds a pointer to it under the same
lease, so it is shared and expires the same way; ``sweep`` (every router, every SWEEP_EVERY_S)
deletes the files whose key is gone.

Bounds: etcd holds at most ``max_records`` records and pointers (counted at most every few
seconds). A record over that bound, or one written while etcd is away (for ETCD_PAUSE_S after
a failed write, etcd is not tried), is kept in this router's memory instead (an LRU of
``local_bytes``, same TTL): only this router then finds it, and it is gone when the router
restarts or the LRU needs the room.

A background run also keeps a mark, ``/epdserve/<cluster>/responses-running/<id>``, on a lease
of RUN_TTL_S that the router running it renews (``mark_running``): a record still ``queued`` or
``in_progress`` whose mark is gone was left by a router that died, and readers settle it as
failed (api/responses.py) rather than let clients poll a run nobody runs until the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from etcd3aio import Etcd3Client, prefix_range_end

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, EtcdSession
from services.router.batches.files import sync_write

log = logging.getLogger(__name__)

COUNT_EVERY_S = 5.0  # how stale the count of records in etcd may be
ETCD_PAUSE_S = 5.0  # after a failed write, records go straight to memory this long
SWEEP_EVERY_S = 60.0  # how often a router deletes the files of expired records
# NOTE: a file is written before its pointer, so a sweep spares younger files than this (a
# pointer put takes at most two bounded etcd calls, ~8 s).
SWEEP_GRACE_S = 30.0
# A background run's mark outlives its router by at most this; the router renews it every
# RUN_RENEW_S (the run's cancel watch looks every second: api/responses.py), on a lease of at
# most that age. NOTE: so a mark outlives a stall of its router's renewals (a busy loop, etcd
# slow or stopped a while) of RUN_TTL_S - RUN_RENEW_S: with a 10 s lease renewed every 3.3 s
# that was 6.7 s, and a stall of ~3 s let another router store a live run as failed.
RUN_TTL_S = 30.0
RUN_RENEW_S = 3.0
POINTER = "$file"  # the key of a pointer record: {"$file": "<id>.json"}
_FILE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # NOTE: ids name files: nothing else passes


def responses_prefix(cluster: str) -> str:
    return f"/epdserve/{cluster}/responses/"


def running_prefix(cluster: str) -> str:
    return f"/epdserve/{cluster}/responses-running/"


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


class _Files:
    """Large records as files of one shared folder (blocking calls: run them off the loop)."""

    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root)

    def path(self, rid: str) -> Path | None:
        return self.dir / f"{rid}.json" if _FILE_ID.match(rid) else None

    def write(self, rid: str, value: bytes) -> str:
        path = self.path(rid)
        assert path is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        sync_write(path, value)
        return path.name

    def read(self, name: str) -> bytes | None:
        path = self.path(name.removesuffix(".json"))
        try:
            return path.read_bytes() if path is not None else None
        except FileNotFoundError:  # deleted or swept since the pointer was read
            return None

    def remove(self, rid: str) -> None:
        if (path := self.path(rid)) is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def stale(self, older_than_s: float) -> list[str]:
        """Ids of the records written more than ``older_than_s`` ago (deletes unfinished
        writes as old)."""
        limit, out = time.time() - older_than_s, []
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return []
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime >= limit:
                    continue
                if entry.name.endswith(".json"):
                    out.append(entry.name.removesuffix(".json"))
                elif entry.name.endswith(".tmp"):  # a write that a killed router left
                    os.unlink(entry.path)
        return out


class ResponseStore:
    """Records by response id: in etcd when small, files with an etcd pointer when large, in
    this router's memory when etcd has no room or is away."""

    def __init__(self, endpoints: list[str], cluster: str, ttl_s: float, max_record_bytes: int,
                 max_records: int, local_bytes: int, files_dir: str | Path) -> None:  # fmt: skip
        self.session = EtcdSession(endpoints)
        self.prefix = responses_prefix(cluster)
        self.running = running_prefix(cluster)
        self._run_lease: tuple[int, float] | None = None  # the marks' (id, monotonic grant)
        self.ttl_s = ttl_s
        self.max_record_bytes = max_record_bytes
        self.max_records = max_records
        self.local = _Local(local_bytes)
        self.files = _Files(files_dir)
        self._lease: tuple[int, float] | None = None  # (id, monotonic time granted)
        self._count: tuple[int, float] = (0, -COUNT_EVERY_S)  # (records in etcd, when counted)
        self._etcd_paused_until = 0.0  # monotonic time
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def put(self, rid: str, record: dict[str, Any]) -> None:
        """Store ``record`` (replacing any under ``rid``); never raises for etcd's sake, and
        after an etcd failure skips etcd for ETCD_PAUSE_S (a response waits for no outage)."""
        value = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        self.local.pop(rid)
        if time.monotonic() >= self._etcd_paused_until:
            try:
                if await self._put_shared(rid, value):
                    return
                # NOTE: kept locally: no earlier, smaller state of it (a background run's
                # "queued") may stay in etcd for other routers to read.
                await self._delete_shared(rid)
            except Exception as exc:  # noqa: BLE001 - etcd away: this router keeps it
                self._etcd_paused_until = time.monotonic() + ETCD_PAUSE_S
                log.warning("storing response %s in etcd failed (%s); kept locally", rid, exc)
        if not self.local.put(rid, value, self.ttl_s):
            log.warning("response %s (%d bytes) is larger than the local store", rid, len(value))

    async def _put_shared(self, rid: str, value: bytes) -> bool:
        """``value`` in etcd, or as a file with a pointer in etcd; False: no room in etcd."""
        if len(value) <= self.max_record_bytes:
            if not await self._put_etcd(rid, value):
                return False
            await asyncio.to_thread(self.files.remove, rid)  # an earlier, larger state's
            return True
        if self.files.path(rid) is None:
            return False
        try:
            name = await asyncio.to_thread(self.files.write, rid, value)
        except OSError as exc:  # the folder: not etcd's fault
            log.warning("writing response %s under %s failed: %s", rid, self.files.dir, exc)
            return False
        try:
            if await self._put_etcd(rid, json.dumps({POINTER: name}).encode()):
                return True
        except BaseException:
            await asyncio.to_thread(self.files.remove, rid)
            raise
        await asyncio.to_thread(self.files.remove, rid)
        return False

    async def get(self, rid: str) -> dict[str, Any] | None:
        """The record of ``rid``, or None (never stored, expired, deleted)."""
        value = self.local.get(rid)
        if value is None:

            async def get(c: Etcd3Client) -> bytes | None:
                assert c.kv is not None
                resp = await c.kv.get(self.prefix + rid, timeout=ETCD_OP_TIMEOUT_S)
                return resp.kvs[0].value if resp.kvs else None

            value = await self.session.call(get)
        record = json.loads(value) if value is not None else None
        if record is not None and POINTER in record:
            value = await asyncio.to_thread(self.files.read, record[POINTER])
            record = json.loads(value) if value is not None else None
        return record

    async def mark_running(self, rid: str) -> None:
        """(Re)new the mark of this router's background run ``rid`` for RUN_TTL_S; raises when
        etcd is away (the run goes on; its readers cannot judge it then)."""

        async def put(c: Etcd3Client) -> None:
            assert c.kv is not None and c.lease is not None
            now = time.monotonic()
            if self._run_lease is None or now - self._run_lease[1] > RUN_RENEW_S:
                grant = await c.lease.grant(int(RUN_TTL_S), timeout=ETCD_OP_TIMEOUT_S)
                self._run_lease = (grant.ID, now)
            await c.kv.put(self.running + rid, b"", lease=self._run_lease[0],
                           timeout=ETCD_OP_TIMEOUT_S)  # fmt: skip

        try:
            await self.session.call(put)
        except Exception:
            self._run_lease = None  # granted on a client that failed: may be gone
            raise

    async def unmark_running(self, rid: str) -> None:
        async def delete(c: Etcd3Client) -> None:
            assert c.kv is not None
            await c.kv.delete(self.running + rid, timeout=ETCD_OP_TIMEOUT_S)

        await self.session.call(delete)

    async def is_marked_running(self, rid: str) -> bool:
        """Whether some router runs ``rid`` (its mark is there); raises when etcd is away."""

        async def get(c: Etcd3Client) -> bool:
            assert c.kv is not None
            resp = await c.kv.get(self.running + rid, keys_only=True, timeout=ETCD_OP_TIMEOUT_S)
            return bool(resp.kvs)

        return await self.session.call(get)

    async def delete(self, rid: str) -> bool:
        """Whether a record of ``rid`` was there."""
        local = self.local.pop(rid)
        return await self._delete_shared(rid) or local

    async def _delete_shared(self, rid: str) -> bool:
        async def delete(c: Etcd3Client) -> int:
            assert c.kv is not None
            resp = await c.kv.delete(self.prefix + rid, timeout=ETCD_OP_TIMEOUT_S)
            return int(resp.deleted)

        found = bool(await self.session.call(delete))
        await asyncio.to_thread(self.files.remove, rid)
        return found

    async def sweep(self, older_than_s: float = SWEEP_GRACE_S) -> int:
        """Delete the files (older than ``older_than_s``) whose etcd pointer is gone (expired
        or deleted); how many. Raises when etcd cannot say which pointers live."""
        stale = await asyncio.to_thread(self.files.stale, older_than_s)
        if not stale:
            return 0

        async def live(c: Etcd3Client) -> set[str]:
            assert c.kv is not None
            resp = await c.kv.get(self.prefix, range_end=prefix_range_end(self.prefix.encode()),
                                  keys_only=True, timeout=ETCD_OP_TIMEOUT_S)  # fmt: skip
            return {kv.key.decode()[len(self.prefix) :] for kv in resp.kvs}

        keep = await self.session.call(live)
        gone = [rid for rid in stale if rid not in keep]
        for rid in gone:
            await asyncio.to_thread(self.files.remove, rid)
        return len(gone)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                if removed := await self.sweep():
                    log.info("deleted %d files of expired responses", removed)
            except Exception as exc:  # noqa: BLE001 - etcd away: the next round
                log.warning("sweeping the files of expired responses failed: %s", exc)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
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
