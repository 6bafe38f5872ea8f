"""One run of the batch executor in process, over an in-memory record store and a real batch
folder, with each line's answer made up (no gateway): a run resumes from the records an earlier
run left and never sends a recorded line again; a batch whose completion window has passed
ends expired with its unrun lines in the error file (OpenAI) or as ``expired`` results
(Anthropic); "not now" answers are tried again."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest

from services.router.batches import executor as executor_mod
from services.router.batches.executor import BatchExecutor, BatchRun
from services.router.batches.files import FileStore
from services.router.batches.records import (
    ACTIVE,
    COMPLETION_WINDOW_S,
    BatchRecord,
    LineResult,
)
from services.router.batches.results import Results
from services.router.batches.validate import BatchLine, lines_to_jsonl
from services.router.metrics import RouterMetrics


class MemoryStore:
    """BatchStore's calls over a dict."""

    def __init__(self) -> None:
        self.recs: dict[str, BatchRecord] = {}

    async def get(self, batch_id: str) -> BatchRecord | None:
        return self.recs.get(batch_id)

    async def active_ids(self) -> list[str]:
        return [r.id for r in self.recs.values() if r.status in ACTIVE]

    async def drop_active(self, batch_id: str) -> None:
        pass

    async def update(self, batch_id, change):  # type: ignore[no-untyped-def]
        old = self.recs.get(batch_id)
        if old is None:
            return None
        new = change(replace(old))
        if new is not None:
            self.recs[batch_id] = new
        return self.recs[batch_id]


def _setup(tmp_path, api: str = "openai", created_at: int | None = None, n: int = 3):
    files, store = FileStore(tmp_path), MemoryStore()
    url = "/v1/messages" if api == "anthropic" else "/v1/completions"
    lines = [BatchLine(f"l{i}", url, {"model": "m", "prompt": str(i)}) for i in range(n)]
    files.create(lines_to_jsonl(lines), "in.jsonl", "batch", "file-in")
    rec = BatchRecord("batch_t", api, url, "file-in", created_at or int(time.time()), total=n)
    store.recs[rec.id] = rec
    ex = BatchExecutor(None, store, files, lambda: True, concurrency=2,  # type: ignore[arg-type]
                       metrics=RouterMetrics())  # fmt: skip
    return ex, store, files


def _answers(monkeypatch, statuses: dict[str, list[int]] | None = None) -> list[str]:
    """Make every line answer 200 (or the statuses listed for it, in turn); the custom_ids
    sent, in order."""
    sent: list[str] = []

    async def run_line(gw, endpoint, custom_id, body):  # type: ignore[no-untyped-def]
        sent.append(custom_id)
        queue = (statuses or {}).get(custom_id, [])
        status = queue.pop(0) if queue else 200
        return LineResult(custom_id, status, f"batch_req_{custom_id}", {"echo": body["prompt"]})

    monkeypatch.setattr(executor_mod, "run_line", run_line)
    return sent


def _recorded(root, result: LineResult) -> None:
    """``result`` as an earlier run of batch_t recorded it."""
    earlier = Results(root, "batch_t")
    earlier.open("earlier-run")
    earlier.append(result)
    earlier.close()


def _jsonl(files: FileStore, file_id: str | None) -> list[dict]:
    assert file_id is not None
    return [json.loads(x) for x in (files.read(file_id) or b"").decode().splitlines()]


def test_a_resumed_run_sends_only_the_lines_not_recorded(tmp_path, monkeypatch) -> None:
    ex, store, files = _setup(tmp_path)
    store.recs["batch_t"] = replace(store.recs["batch_t"], status="in_progress")
    # A run on a router that died after one line.
    _recorded(tmp_path, LineResult("l1", 200, "batch_req_old", {"echo": "from before"}))
    sent = _answers(monkeypatch)
    asyncio.run(BatchRun(ex, "batch_t").go())
    rec = store.recs["batch_t"]
    assert sorted(sent) == ["l0", "l2"]
    assert (rec.status, rec.completed, rec.failed) == ("completed", 3, 0)
    out = _jsonl(files, rec.output_file_id)
    assert [o["custom_id"] for o in out] == ["l0", "l1", "l2"]
    assert out[1]["response"]["body"] == {"echo": "from before"}
    assert not (tmp_path / "results" / "batch_t").exists()  # the outputs hold everything


def test_not_now_answers_are_tried_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(executor_mod, "RETRY_MAX_S", 0.01)
    ex, store, files = _setup(tmp_path, n=2)
    sent = _answers(monkeypatch, {"l0": [503, 429], "l1": [400]})
    asyncio.run(BatchRun(ex, "batch_t").go())
    rec = store.recs["batch_t"]
    assert sorted(sent) == ["l0", "l0", "l0", "l1"]
    assert (rec.status, rec.completed, rec.failed, rec.total) == ("completed", 1, 1, 2)
    assert [e["custom_id"] for e in _jsonl(files, rec.error_file_id)] == ["l1"]
    sample = ex.metrics.registry.get_sample_value
    assert sample("epdserve:router_batch_lines_total", {"outcome": "completed"}) == 1
    assert sample("epdserve:router_batch_lines_total", {"outcome": "failed"}) == 1
    assert sample("epdserve:router_batches_ended_total", {"status": "completed"}) == 1


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_batch_past_its_window_ends_expired(tmp_path, monkeypatch, api) -> None:
    ex, store, files = _setup(tmp_path, api, created_at=int(time.time()) - COMPLETION_WINDOW_S)
    store.recs["batch_t"] = replace(store.recs["batch_t"], status="in_progress")
    _recorded(tmp_path, LineResult("l0", 200, "batch_req_l0", {"echo": "0"}))
    sent = _answers(monkeypatch)
    asyncio.run(BatchRun(ex, "batch_t").go())
    rec = store.recs["batch_t"]
    assert sent == [] and rec.status == "expired" and rec.expired_at
    assert (rec.completed, rec.failed) == (1, 0)
    if api == "openai":
        assert rec.openai()["expired_at"] == rec.expired_at
        errors = _jsonl(files, rec.error_file_id)
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
            ("l1", "batch_expired"), ("l2", "batch_expired")]  # fmt: skip
        assert [o["custom_id"] for o in _jsonl(files, rec.output_file_id)] == ["l0"]
    else:
        view = rec.anthropic("http://h")
        assert view["processing_status"] == "ended"
        assert view["request_counts"]["expired"] == 2
        results = _jsonl(files, rec.results_file_id)
        assert [r["result"]["type"] for r in results] == ["succeeded", "expired", "expired"]
