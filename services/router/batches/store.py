"""Batch records in etcd: ``/epdserve/<cluster>/batches/<id>`` holds a ``BatchRecord`` as
JSON, and ``/epdserve/<cluster>/batches-active/<id>`` (empty) marks one the executor still
owes work, so the leader's look for work every second reads those only, however many ended
batches are kept; the mark goes in the same transaction that ends the batch. Every change is a compare-and-swap on the value read, so the executor's counts and an
API's cancel never overwrite each other. Calls go through one ``EtcdSession`` (reconnects,
every call bounded by a timeout)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from etcd3aio import Etcd3Client, prefix_range_end

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, EtcdSession
from services.router.batches.records import ENDED, BatchRecord

T = TypeVar("T")

CAS_ATTEMPTS = 20  # a record changes a few times a second at most


class BatchStoreError(RuntimeError):
    """etcd could not be reached (or kept changing the record) while reading or writing."""


def batches_prefix(cluster: str) -> str:
    return f"/epdserve/{cluster}/batches/"


def active_prefix(cluster: str) -> str:
    return f"/epdserve/{cluster}/batches-active/"


class BatchStore:
    def __init__(self, endpoints: list[str], cluster: str) -> None:
        self.endpoints = endpoints
        self.prefix = batches_prefix(cluster)
        self.active = active_prefix(cluster)
        self._session = EtcdSession(endpoints)

    async def create(self, rec: BatchRecord) -> None:
        key = self.prefix + rec.id

        async def put(c: Etcd3Client) -> bool:
            assert c.kv is not None
            resp = await c.kv.txn(
                compare=[c.kv.txn_compare_create_revision(key, 0)],
                success=[c.kv.txn_op_put(key, rec.dumps()),
                         c.kv.txn_op_put(self.active + rec.id, b"")],
                timeout=ETCD_OP_TIMEOUT_S,
            )  # fmt: skip
            return bool(resp.succeeded)

        if not await self._call(put):
            raise BatchStoreError(f"batch {rec.id} exists already")

    async def get(self, batch_id: str) -> BatchRecord | None:
        raw = await self._raw(batch_id)
        return BatchRecord.loads(raw) if raw is not None else None

    async def active_ids(self) -> list[str]:
        """The ids of the batches not ended yet."""

        async def get(c: Etcd3Client) -> list[str]:
            assert c.kv is not None
            resp = await c.kv.get(
                self.active, range_end=prefix_range_end(self.active.encode()), keys_only=True,
                timeout=ETCD_OP_TIMEOUT_S,
            )  # fmt: skip
            return [kv.key.decode()[len(self.active) :] for kv in resp.kvs]

        return await self._call(get)

    async def drop_active(self, batch_id: str) -> None:
        """Forget a mark whose batch ended or is gone."""

        async def delete(c: Etcd3Client) -> None:
            assert c.kv is not None
            await c.kv.delete(self.active + batch_id, timeout=ETCD_OP_TIMEOUT_S)

        await self._call(delete)

    async def all(self) -> list[BatchRecord]:
        """Every batch, newest first."""

        async def get(c: Etcd3Client) -> list[bytes]:
            assert c.kv is not None
            resp = await c.kv.get(
                self.prefix, range_end=prefix_range_end(self.prefix.encode()),
                timeout=ETCD_OP_TIMEOUT_S,
            )  # fmt: skip
            return [kv.value for kv in resp.kvs]

        recs = [BatchRecord.loads(v) for v in await self._call(get)]
        recs.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return recs

    async def delete_ended(self, batch_id: str) -> bool:
        """Delete the record of ``batch_id`` if it is as read now, ended (retention.py);
        whether it went."""
        key = self.prefix + batch_id
        old = await self._raw(batch_id)
        if old is None or BatchRecord.loads(old).status not in ENDED:
            return False

        async def delete(c: Etcd3Client) -> bool:
            assert c.kv is not None
            resp = await c.kv.txn(
                compare=[c.kv.txn_compare_value(key, old)], success=[c.kv.txn_op_delete(key)],
                timeout=ETCD_OP_TIMEOUT_S,
            )  # fmt: skip
            return bool(resp.succeeded)

        return await self._call(delete)

    async def update(
        self, batch_id: str, change: Callable[[BatchRecord], BatchRecord | None]
    ) -> BatchRecord | None:
        """Apply ``change`` to the stored record (a copy) and store it if nothing wrote in
        between (else read and apply again). ``change`` returns None to leave it as is.
        The record as stored now; None when there is no such batch."""
        key = self.prefix + batch_id
        for _ in range(CAS_ATTEMPTS):
            old = await self._raw(batch_id)
            if old is None:
                return None
            new = change(BatchRecord.loads(old))
            if new is None:
                return BatchRecord.loads(old)

            async def swap(c: Etcd3Client, old: bytes = old, new: BatchRecord = new) -> bool:
                assert c.kv is not None
                ops = [c.kv.txn_op_put(key, new.dumps())]
                if new.status in ENDED:
                    ops.append(c.kv.txn_op_delete(self.active + batch_id))
                resp = await c.kv.txn(
                    compare=[c.kv.txn_compare_value(key, old)], success=ops,
                    timeout=ETCD_OP_TIMEOUT_S,
                )  # fmt: skip
                return bool(resp.succeeded)

            if await self._call(swap):
                return new
        raise BatchStoreError(f"batch {batch_id} kept changing; update given up")

    async def close(self) -> None:
        await self._session.close()

    async def _raw(self, batch_id: str) -> bytes | None:
        async def get(c: Etcd3Client) -> bytes | None:
            assert c.kv is not None
            resp = await c.kv.get(self.prefix + batch_id, timeout=ETCD_OP_TIMEOUT_S)
            return resp.kvs[0].value if resp.kvs else None

        return await self._call(get)

    async def _call(self, fn: Callable[[Etcd3Client], Awaitable[T]]) -> T:
        try:
            return await self._session.call(fn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise BatchStoreError(f"etcd unavailable: {exc}") from exc
