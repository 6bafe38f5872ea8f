"""The durable part of batches without a cluster: per-line records survive a torn write and
a second run, the first record of a line wins; the API views of a record; paging; an input
file read back line for line as its upload was checked."""

from __future__ import annotations

import json

from services.router.batches.records import CANCELLED, BatchRecord, LineResult
from services.router.batches.results import Results
from services.router.batches.service import paginate
from services.router.batches.upload import lines_of
from services.router.batches.validate import BatchLine, check_openai_file, parse_stored


def _result(cid: str, status: int = 200, text: str = "x") -> LineResult:
    return LineResult(cid, status, f"batch_req_{cid}", {"text": text})


def test_a_torn_record_is_ignored_and_the_next_run_appends_cleanly(tmp_path) -> None:
    first = Results(tmp_path, "batch_1")
    first.open("run-a")
    first.append(_result("a"))
    first.append(_result("b"))
    first.close()
    part = tmp_path / "results" / "batch_1" / "run-a.jsonl"
    # A crash in the middle of the third record: half a line, no newline.
    with open(part, "a") as f:
        f.write(_result("c").dumps()[:20])
    assert set(Results(tmp_path, "batch_1").read()) == {"a", "b"}
    # The same run id appends again (a restart that reuses it): the torn half stays alone.
    again = Results(tmp_path, "batch_1")
    again.open("run-a")
    again.append(_result("c"))
    again.close()
    assert set(Results(tmp_path, "batch_1").read()) == {"a", "b", "c"}


def test_the_first_record_of_a_line_wins_over_every_part(tmp_path) -> None:
    # Two runs that overlapped (a leader that had not yet seen its loss) both answered "b".
    for run, text in (("run-a", "first"), ("run-b", "second")):
        r = Results(tmp_path, "batch_2")
        r.open(run)
        r.append(_result("b", text=text))
        r.close()
    got = Results(tmp_path, "batch_2").read()
    assert list(got) == ["b"] and got["b"].body == {"text": "first"}
    Results(tmp_path, "batch_2").remove()
    assert Results(tmp_path, "batch_2").read() == {}


def test_output_lines_in_each_apis_format() -> None:
    ok, bad = _result("a"), LineResult("b", 400, "batch_req_b", {"error": {"message": "no"}})
    assert ok.openai() == {
        "id": "batch_req_a", "custom_id": "a", "error": None,
        "response": {"status_code": 200, "request_id": "batch_req_a", "body": {"text": "x"}},
    }  # fmt: skip
    lost = LineResult("c", 0, "batch_req_c", None, {"code": "server_error", "message": "m"})
    assert lost.openai()["response"] is None and lost.openai()["error"]["code"] == "server_error"
    assert ok.anthropic() == {"custom_id": "a", "result": {"type": "succeeded",
                                                           "message": {"text": "x"}}}  # fmt: skip
    errored = bad.anthropic()["result"]
    assert errored["type"] == "errored" and errored["error"]["type"] == "error"


def test_a_cancelled_message_batch_counts_its_unrun_requests_as_canceled() -> None:
    rec = BatchRecord("msgbatch_x", "anthropic", "/v1/messages", "file-x", 1000, status=CANCELLED,
                      total=5, completed=2, failed=1, cancelling_at=1001,
                      cancelled_at=1002)  # fmt: skip
    view = rec.anthropic("http://h")
    assert view["processing_status"] == "ended"
    assert view["request_counts"] == {"processing": 0, "succeeded": 2, "errored": 1,
                                      "canceled": 2, "expired": 0}  # fmt: skip
    assert view["ended_at"] == "1970-01-01T00:16:42Z"
    assert view["results_url"] == "http://h/v1/messages/batches/msgbatch_x/results"
    assert BatchRecord.loads(rec.dumps()) == rec
    assert json.loads(rec.dumps())["api"] == "anthropic"


def test_pages_after_and_before_an_id() -> None:
    items = [f"b{i}" for i in range(5)]  # newest first
    assert paginate(items, str, 2, None) == (["b0", "b1"], True)
    assert paginate(items, str, 2, "b1") == (["b2", "b3"], True)
    assert paginate(items, str, 2, "b3") == (["b4"], False)
    assert paginate(items, str, 2, None, "b3") == (["b1", "b2"], True)
    assert paginate(items, str, 2, None, "b1") == (["b0"], False)


def test_a_line_holding_a_unicode_line_separator_is_read_as_one_line(tmp_path) -> None:
    # JSON strings may hold U+2028, U+2029 and U+0085 raw: the upload's check (lines_of) took
    # such a file, and reading it back cut the line there (a 500 from POST /v1/batches).
    texts = ["a\u2028b", "c\u2029d", "e\x85f"]
    lines = [BatchLine(f"l{i}", "/v1/completions", {"model": "m", "prompt": t})
             for i, t in enumerate(texts)]  # fmt: skip
    content = "".join(
        json.dumps({"custom_id": ln.custom_id, "method": "POST", "url": ln.url, "body": ln.body},
                   ensure_ascii=False) + "\n"
        for ln in lines
    ).encode()  # fmt: skip
    (path := tmp_path / "in.jsonl").write_bytes(content)
    assert check_openai_file(lines_of(path), 10) == 3
    assert parse_stored(content) == lines
