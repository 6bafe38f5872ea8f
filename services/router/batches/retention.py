"""Retention of the Batch APIs' state (``--batch-retention-s``): the leader's executor sweeps
now and then, deleting

- ended batches whose end is older than the retention: the record in etcd, then its output,
  error or results file and a message batch's stored requests;
- files older than the retention that no kept batch names (uploads nobody ran or whose
  batches went, outputs of batches deleted by hand).

A batch kept (running, or ended less than the retention ago) keeps its input and outputs
whatever their age. A file object says when it goes (``expires_at``, as OpenAI's do). The record goes first: a
sweep cut short leaves files, which the next sweep finds by their age; never a record whose
files are gone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.router.batches.files import FileStore
from services.router.batches.records import ENDED, BatchRecord
from services.router.batches.store import BatchStore

log = logging.getLogger(__name__)

SWEEP_S = 600.0  # the leader sweeps this often
# A temporary file not written to for this long belongs to no request any more (an upload
# writes its body as it arrives; checking the lines of 64 MiB takes seconds).
TEMPORARY_S = 3600.0


def ended_at(rec: BatchRecord) -> int | None:
    """When ``rec`` ended (unix seconds); None while it runs."""
    if rec.status not in ENDED:
        return None
    times = (rec.completed_at, rec.failed_at, rec.cancelled_at, rec.expired_at)
    return max((t for t in times if t is not None), default=rec.created_at)


def files_of(rec: BatchRecord) -> list[str]:
    """The files a batch wrote or (a message batch) stored its requests in."""
    ids = [rec.output_file_id, rec.error_file_id, rec.results_file_id]
    if rec.api == "anthropic":
        ids.append(rec.input_file_id)  # made for the batch: nobody else reads it
    return [i for i in ids if i]


@dataclass
class Swept:
    batches: int = 0
    files: int = 0
    temporaries: int = 0  # left by requests that a killed router never ended


async def _delete(files: FileStore, file_id: str) -> bool:
    """Delete one file; a file that cannot be deleted (permissions, a shared volume's error)
    is logged and left for the next sweep, not the end of this one."""
    try:
        return await asyncio.to_thread(files.delete, file_id)
    except OSError as exc:
        log.warning("batch retention: cannot delete %s: %s", file_id, exc)
        return False


async def sweep(store: BatchStore, files: FileStore, retention_s: float, now: float) -> Swept:
    """Delete what is older than ``retention_s`` at ``now`` (unix seconds); what went."""
    out = Swept()
    cutoff = now - retention_s
    named: set[str] = set()  # files of the batches kept
    for rec in await store.all():
        end = ended_at(rec)
        if end is not None and end <= cutoff and await store.delete_ended(rec.id):
            out.batches += 1
            for file_id in files_of(rec):
                out.files += await _delete(files, file_id)
        else:
            named.update([rec.input_file_id, *files_of(rec)])
    for meta in await asyncio.to_thread(files.all):
        if meta.get("created_at", 0) <= cutoff and meta["id"] not in named:
            out.files += await _delete(files, meta["id"])
    try:
        out.temporaries = await asyncio.to_thread(files.remove_temporaries, now - TEMPORARY_S)
    except OSError as exc:
        log.warning("batch retention: cannot delete temporary files: %s", exc)
    if out.batches or out.files or out.temporaries:
        log.info("batch retention: %d batches and %d files older than %g s deleted, and %d "
                 "temporary files", out.batches, out.files, retention_s, out.temporaries)  # fmt: skip
    return out
