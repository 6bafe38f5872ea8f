"""What the Batch APIs hold in one router: the files, the records in etcd and the executor,
and the steps both APIs share (create a batch, cancel it, list a page)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from services.router.auth import presented_key
from services.router.batches.executor import BatchExecutor
from services.router.batches.files import FileStore
from services.router.batches.records import (
    CANCELLING,
    ENDED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    BatchRecord,
)
from services.router.batches.store import BatchStore, BatchStoreError
from services.router.batches.validate import BatchLine
from services.router.errors import APIError, bad_request

if TYPE_CHECKING:
    from services.router.gateway import Gateway


class BatchService:
    def __init__(self, gw: Gateway) -> None:
        cfg = gw.cfg
        self.gw = gw
        self.files = FileStore(cfg.batch_root, cfg.batch_retention_s)
        self.store = BatchStore(cfg.etcd_endpoints, cfg.cluster)
        self.executor = BatchExecutor(
            gw, self.store, self.files, lambda: gw.rebalancer.is_leader, cfg.batch_concurrency
        )

    async def start(self) -> None:
        await self.executor.start()

    async def stop(self) -> None:
        await self.executor.stop()
        await self.store.close()

    def check_models(self, lines: list[BatchLine], param: str) -> None:
        """400 for a model no worker serves (when workers are known at all)."""
        models = self.gw.pool.models()
        for line in lines:
            if models and line.body["model"] not in models:
                raise APIError(
                    400, f"custom_id {line.custom_id!r}: the model '{line.body['model']}' does "
                    f"not exist; available: {', '.join(sorted(models))}", param=param,
                    code="model_not_found",
                )  # fmt: skip

    async def create(self, rec: BatchRecord) -> BatchRecord:
        await self._etcd(self.store.create(rec))
        return rec

    def owner(self, request: Request) -> str | None:
        """Whose files and batches a request sees: a digest of its API key (checked already);
        None when the gateway has no keys. NOTE: the key itself is never stored."""
        if not self.gw.api_keys:
            return None
        key = presented_key(request) or ""
        return hashlib.sha256(b"epdserve-batch-owner:" + key.encode()).hexdigest()[:32]

    def file(self, file_id: str, owner: str | None, param: str = "id") -> dict[str, Any]:
        """The stored file object, or a 404 (no such file, or another key's)."""
        meta = self.files.get(file_id)
        if meta is None or meta.get("owner") != owner:
            raise APIError(404, f"No such File object: {file_id}", param=param, code="not_found")
        return meta

    async def get(self, batch_id: str, api: str, owner: str | None) -> BatchRecord:
        rec = await self._etcd(self.store.get(batch_id))
        if rec is None or rec.api != api or rec.owner != owner:
            raise APIError(404, f"No batch found with id '{batch_id}'", code="not_found")
        return rec

    async def cancel(self, batch_id: str, api: str, owner: str | None) -> BatchRecord:
        """Ask the executor to stop the batch (it ends as cancelled); 400 once it ended."""
        await self.get(batch_id, api, owner)
        now = int(time.time())

        def change(r: BatchRecord) -> BatchRecord | None:
            if r.status in (VALIDATING, IN_PROGRESS):
                return replace(r, status=CANCELLING, cancelling_at=now)
            return None

        rec = await self._etcd(self.store.update(batch_id, change))
        assert rec is not None
        if rec.status in ENDED:
            raise bad_request(f"Cannot cancel a batch with status '{rec.status}'",
                              code="invalid_status")  # fmt: skip
        if rec.status not in (CANCELLING, FINALIZING):
            raise APIError(409, f"batch {batch_id} is {rec.status}")
        return rec

    async def page(
        self, api: str, owner: str | None, limit: int, after: str | None = None,
        before: str | None = None,
    ) -> tuple[list[BatchRecord], bool]:  # fmt: skip
        """One page of ``owner``'s ``api`` batches, newest first, after (or before) a batch
        id; and whether more follow."""
        recs = [r for r in await self._etcd(self.store.all()) if (r.api, r.owner) == (api, owner)]
        return paginate(recs, lambda r: r.id, limit, after, before)

    async def read_file(self, file_id: str) -> bytes | None:
        return await asyncio.to_thread(self.files.read, file_id)

    @staticmethod
    async def _etcd(call):  # type: ignore[no-untyped-def]
        try:
            return await call
        except BatchStoreError as exc:
            raise APIError(503, f"batch state unavailable: {exc}", code="etcd_unavailable") from exc


def paginate(
    items: list[Any], key: Callable[[Any], str], limit: int, after: str | None,
    before: str | None = None,
) -> tuple[list[Any], bool]:  # fmt: skip
    """``limit`` items after the one whose key is ``after`` (or the ``limit`` just before
    ``before``); and whether more follow in that direction."""
    ids = [key(i) for i in items]
    if after is not None:
        start = ids.index(after) + 1 if after in ids else len(ids)
        page = items[start : start + limit]
        return page, start + limit < len(items)
    if before is not None:
        end = ids.index(before) if before in ids else 0
        page = items[max(0, end - limit) : end]
        return page, end - limit > 0
    return items[:limit], limit < len(items)


def page_limit(raw: str | None, default: int, most: int) -> int:
    if raw is None:
        return default
    # NOTE: str.isdigit takes "²" too, which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise bad_request(f"limit must be an integer in [1, {most}]", param="limit")
    return int(raw)
