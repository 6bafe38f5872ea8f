"""The batch executor: on the router that leads the election (the rebalancer's, in
``rebalance/leader.py``), every active batch runs here, line by line through the serving
pipeline as offline work.

A run of one batch: validating -> in_progress (total counted) -> each line not yet recorded
is sent (``--batch-concurrency`` at a time) and its answer recorded on disk (results.py)
before it counts -> finalizing (the output files written from every record) -> completed; or
cancelling (the API's cancel) -> cancelled. Counts go to etcd every half second, so they move
while it runs. A router that stops leading cancels its runs; the next leader resumes each
batch from its records, so a line is never counted twice nor lost. A line that got "not now"
(429, 503: no worker, router full) waits and is tried again; other answers are its result.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from services.common.aio import cancel_and_wait
from services.router.batches.files import FileStore
from services.router.batches.records import (
    ACTIVE,
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    BatchRecord,
    LineResult,
    unrun_line,
)
from services.router.batches.results import Results, jsonl
from services.router.batches.retention import SWEEP_S, sweep
from services.router.batches.runner import RETRY_STATUSES, run_line
from services.router.batches.store import BatchStore, BatchStoreError
from services.router.batches.validate import BatchLine, parse_stored

if TYPE_CHECKING:
    from services.router.gateway import Gateway
    from services.router.metrics import RouterMetrics

log = logging.getLogger(__name__)

SYNC_S = 0.5  # counts reach etcd (and a cancel reaches the run) this often
RETRY_MAX_S = 5.0  # longest wait before a line that got 429/503 is tried again


class BatchExecutor:
    """Runs every active batch while ``is_leader()``; stops them when it turns false."""

    def __init__(
        self, gw: Gateway, store: BatchStore, files: FileStore, is_leader: Callable[[], bool],
        concurrency: int, poll_s: float = 1.0, metrics: RouterMetrics | None = None,
    ) -> None:  # fmt: skip
        self.gw, self.store, self.files = gw, store, files
        self.metrics = metrics or gw.metrics  # the gateway's, unless given (tests)
        self.is_leader = is_leader
        self.concurrency = concurrency
        self.poll_s = poll_s
        self.runs: dict[str, asyncio.Task[None]] = {}  # batch id -> its run here
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-executor")

    async def stop(self) -> None:
        await cancel_and_wait(self._task, *self.runs.values())
        self.runs.clear()

    async def _loop(self) -> None:
        swept = 0.0  # when the last retention sweep ran (time.monotonic())
        while True:
            try:
                await self._step()
                retention = self.files.retention_s
                if retention and self.is_leader() and time.monotonic() - swept >= SWEEP_S:
                    swept = time.monotonic()
                    await sweep(self.store, self.files, retention, time.time())
            except BatchStoreError as exc:
                log.warning("batch executor: %s; retrying", exc)
            except Exception:  # noqa: BLE001 - a bad record or file must not stop every batch
                log.exception("batch executor: step or retention sweep failed; retrying")
            await asyncio.sleep(self.poll_s)

    async def _step(self) -> None:
        for batch_id, task in list(self.runs.items()):
            if task.done():
                del self.runs[batch_id]
                if not task.cancelled() and task.exception() is not None:
                    log.error("batch %s run failed", batch_id, exc_info=task.exception())
        self.metrics.batches_running.set(len(self.runs))
        if not self.is_leader():
            if self.runs:
                log.info("not the leader any more: %d batch runs stopped", len(self.runs))
                await cancel_and_wait(*self.runs.values())
                self.runs.clear()
            return
        for batch_id in await self.store.active_ids():
            if batch_id not in self.runs:
                log.info("batch %s: run starts here", batch_id)
                run = BatchRun(self, batch_id)
                self.runs[batch_id] = asyncio.create_task(run.go(), name=f"batch-{batch_id}")


class BatchRun:
    """One run of one batch on this router."""

    def __init__(self, ex: BatchExecutor, batch_id: str) -> None:
        self.ex, self.id = ex, batch_id
        self.results = Results(ex.files.root, batch_id)
        self.done: dict[str, LineResult] = {}
        self._synced = (-1, -1)  # (completed, failed) last written to etcd

    async def go(self) -> None:
        store = self.ex.store
        rec = await store.get(self.id)
        if rec is None or rec.status not in ACTIVE:
            await store.drop_active(self.id)  # NOTE: a mark left by a batch that ended
            return
        content = await asyncio.to_thread(self.ex.files.read, rec.input_file_id)
        if content is None:
            await self._fail(f"input file {rec.input_file_id} is gone")
            return
        lines = parse_stored(content)
        if rec.status == VALIDATING:
            now = int(time.time())
            rec = await store.update(self.id, lambda r: replace(
                r, status=IN_PROGRESS, in_progress_at=now, total=len(lines),
            ) if r.status == VALIDATING else None)  # fmt: skip
            if rec is None:
                return
        self.done = await asyncio.to_thread(self.results.read)
        try:
            if rec.status == IN_PROGRESS:
                pending = [ln for ln in lines if ln.custom_id not in self.done]
                log.info("batch %s: %d of %d lines to run", self.id, len(pending), len(lines))
                await asyncio.to_thread(self.results.open, uuid.uuid4().hex)
                await self._run_lines(pending, rec.expires_at)
        finally:
            await asyncio.to_thread(self.results.close)
        await self._finalize(lines)

    async def _run_lines(self, pending: list[BatchLine], expires_at: float) -> None:
        """Run ``pending`` until all are recorded, the batch is being cancelled, or its
        completion window ends (``expires_at``, unix seconds)."""
        if time.time() >= expires_at:
            return
        queue = iter(pending)  # NOTE: shared by the workers: each line is taken once

        async def work() -> None:
            for line in queue:
                result = await self._answer(line)
                await asyncio.to_thread(self.results.append, result)
                self.done[result.custom_id] = result  # counts only once on disk
                self.ex.metrics.batch_lines.labels("completed" if result.ok else "failed").inc()

        workers = [asyncio.create_task(work()) for _ in range(self.ex.concurrency)]
        every = asyncio.gather(*workers)
        try:
            while not every.done():
                await asyncio.wait({every}, timeout=SYNC_S)
                status = await self._sync()
                if status != IN_PROGRESS:
                    log.info("batch %s is %s: its lines stop", self.id, status)
                    break
                if time.time() >= expires_at:
                    log.warning("batch %s: its completion window ended", self.id)
                    break
        finally:
            await cancel_and_wait(*workers)
            every.cancel()
        if every.done() and not every.cancelled() and every.exception() is not None:
            raise every.exception()  # type: ignore[misc]  # e.g. the disk is full
        await self._sync()

    async def _answer(self, line: BatchLine) -> LineResult:
        """The line's answer; "not now" answers wait and try again."""
        wait = 0.2
        while True:
            try:
                result = await run_line(self.ex.gw, line.url, line.custom_id, line.body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one line's failure, recorded
                log.exception("batch %s line %s failed", self.id, line.custom_id)
                return LineResult(line.custom_id, 0, f"batch_req_{uuid.uuid4().hex}", None,
                                  {"code": "server_error", "message": str(exc)})  # fmt: skip
            if result.status_code not in RETRY_STATUSES:
                return result
            await asyncio.sleep(wait)
            wait = min(RETRY_MAX_S, wait * 2)

    def _counts(self) -> tuple[int, int]:
        ok = sum(r.ok for r in self.done.values())
        return ok, len(self.done) - ok

    async def _sync(self) -> str | None:
        """Write the counts (when they moved); the batch's status as stored (None: the batch
        is gone; etcd away: carry on as in progress)."""
        completed, failed = self._counts()
        try:
            if (completed, failed) == self._synced:
                rec = await self.ex.store.get(self.id)
            else:
                rec = await self.ex.store.update(
                    self.id, lambda r: replace(r, completed=completed, failed=failed)
                )
                self._synced = (completed, failed)
        except BatchStoreError as exc:
            log.warning("batch %s: counts not written: %s", self.id, exc)
            return IN_PROGRESS
        return rec.status if rec is not None else None

    async def _finalize(self, lines: list[BatchLine]) -> None:
        store, now = self.ex.store, int(time.time())
        rec = await store.update(self.id, lambda r: replace(
            r, status=FINALIZING, finalizing_at=now) if r.status == IN_PROGRESS else None)  # fmt: skip
        if rec is None or rec.status not in (FINALIZING, CANCELLING):
            return
        # NOTE: every part, this run's and earlier ones': the first record of a line wins.
        self.done = await asyncio.to_thread(self.results.read)
        # NOTE: lines left unrun while the batch was not being cancelled: its window ended.
        unrun = any(ln.custom_id not in self.done for ln in lines)
        final = CANCELLED if rec.status == CANCELLING else EXPIRED if unrun else COMPLETED
        ids = await asyncio.to_thread(self._write_outputs, rec, lines, final)
        completed, failed = self._counts()

        ended: list[str] = []  # the status this run wrote, if it wrote the last change

        def end(r: BatchRecord) -> BatchRecord | None:
            ended.clear()
            if r.status not in (FINALIZING, CANCELLING):
                return None
            t = int(time.time())
            status = CANCELLED if r.status == CANCELLING else final
            ended.append(status)
            return replace(
                r, **ids, completed=completed, failed=failed, status=status,
                cancelled_at=t if status == CANCELLED else None,
                expired_at=t if status == EXPIRED else None,
                completed_at=t if status == COMPLETED else None,
            )  # fmt: skip

        rec = await store.update(self.id, end)
        log.info("batch %s %s: %d completed, %d failed", self.id,
                 rec and rec.status, completed, failed)  # fmt: skip
        if rec is not None and rec.status in (COMPLETED, CANCELLED, EXPIRED):
            if ended:
                self.ex.metrics.batches_ended.labels(ended[0]).inc()
            await asyncio.to_thread(self.results.remove)

    def _write_outputs(
        self, rec: BatchRecord, lines: list[BatchLine], final: str
    ) -> dict[str, Any]:
        """The batch's output files (blocking) as it ends ``final``; their ids, as record
        fields."""
        ordered = [self.done[ln.custom_id] for ln in lines if ln.custom_id in self.done]
        unrun = [unrun_line(ln.custom_id, rec.api, final)
                 for ln in lines if ln.custom_id not in self.done]  # fmt: skip
        files = self.ex.files
        if rec.api == "anthropic":
            rows = [r.anthropic() for r in ordered] + unrun
            fid = f"file-{rec.id}-results"
            files.create(jsonl(rows), f"{rec.id}_results.jsonl", "batch_results", fid, rec.owner)
            return {"results_file_id": fid}
        out: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for key, ok, name in (
            ("output_file_id", True, "output"),
            ("error_file_id", False, "errors"),
        ):
            rows = [r.openai() for r in ordered if r.ok == ok]
            if not ok and final == EXPIRED:
                rows += unrun
            if rows:
                fid = f"file-{rec.id}-{name}"
                files.create(jsonl(rows), f"{rec.id}_{name}.jsonl", "batch_output", fid,
                             rec.owner)  # fmt: skip
                out[key] = fid
        return out

    async def _fail(self, message: str) -> None:
        now = int(time.time())
        error = {"code": "invalid_file", "message": message, "param": "input_file_id",
                 "line": None}  # fmt: skip
        failed: list[bool] = []  # whether this run wrote the last change

        def fail(r: BatchRecord) -> BatchRecord | None:
            failed[:] = [r.status in ACTIVE]
            return replace(r, status=FAILED, failed_at=now, errors=[error]) if failed[0] else None

        await self.ex.store.update(self.id, fail)
        if failed and failed[0]:
            self.ex.metrics.batches_ended.labels(FAILED).inc()
