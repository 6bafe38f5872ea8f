"""The Batch APIs on a real cluster (etcd, one worker, two routers sharing a batch folder):
the official OpenAI and Anthropic SDKs create batches whose outputs equal the same requests
sent online (greedy); bad inputs are 400s; kill -9 of the router running a batch loses no
line and answers none twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from cluster_helpers import TINY_NAME, anthropic_client, get_json, openai_client, start_cluster

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

MAX_LINES = 40
MAX_FILE_BYTES = 64 * 1024
GREEDY = {"temperature": 0}
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "Hello"]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    batch_dir = tmp_path_factory.mktemp("batches")
    c = start_cluster(
        tiny_model_dir("llama"), workers=1, routers=2,
        router_overrides={
            "batch_dir": str(batch_dir), "batch_max_lines": MAX_LINES,
            "batch_max_file_bytes": MAX_FILE_BYTES, "batch_concurrency": 2,
        },
    )  # fmt: skip
    yield c
    c.stop()


@pytest.fixture(scope="module")
def oai(cluster):
    return openai_client(cluster, timeout=60)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _line(cid: str, url: str, body: dict, method: str = "POST") -> dict:
    return {"custom_id": cid, "method": method, "url": url, "body": body}


def _wait_batch(get, batch_id: str, ended: tuple[str, ...], timeout: float = 120):
    """Poll until the batch's status is one of ``ended``; the statuses seen on the way."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        b = get(batch_id)
        status = getattr(b, "status", None) or b.processing_status
        if not seen or seen[-1][0] != status:
            seen.append((status, b))
        if status in ended:
            return b, seen
        assert time.monotonic() < deadline, f"batch {batch_id} still {status}"
        time.sleep(0.2)


def test_openai_batch_equals_online(oai) -> None:
    chats = [{"model": TINY_NAME, "messages": [{"role": "user", "content": p}],
              "max_tokens": 12, **GREEDY} for p in PROMPTS]  # fmt: skip
    rows = [_line(f"chat-{i}", "/v1/chat/completions", b) for i, b in enumerate(chats)]
    # One line the endpoint refuses (context too long): it lands in the error file.
    rows.append(_line("too-long", "/v1/chat/completions", {**chats[0], "max_tokens": 100000}))
    f = oai.files.create(file=("in.jsonl", _jsonl(rows)), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(_jsonl(rows))
    assert oai.files.retrieve(f.id).id == f.id
    assert oai.files.content(f.id).content == _jsonl(rows)
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                               completion_window="24h", metadata={"job": "t"})  # fmt: skip
    assert batch.status == "validating" and batch.metadata == {"job": "t"}
    done, _ = _wait_batch(oai.batches.retrieve, batch.id, ("completed", "failed"))
    assert done.status == "completed", done
    assert done.request_counts.total == 5
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 1)
    assert done.completed_at and done.in_progress_at and done.finalizing_at
    out = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"chat-{i}" for i in range(4)]
    for o, body in zip(out, chats, strict=True):
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert o["response"]["body"]["service_tier"] == "flex"  # run as offline work
        assert o["id"] == o["response"]["request_id"] and o["id"].startswith("batch_req_")
        online = oai.chat.completions.create(**body)
        got = o["response"]["body"]["choices"][0]["message"]["content"]
        assert got == online.choices[0].message.content
        assert o["response"]["body"]["usage"]["completion_tokens"] == online.usage.completion_tokens
    errors = [json.loads(x) for x in oai.files.content(done.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["too-long"]
    assert errors[0]["response"]["status_code"] == 400
    assert "error" in errors[0]["response"]["body"]
    # Listing and paging: the newest batch first.
    page = oai.batches.list(limit=1)
    assert [b.id for b in page.data] == [batch.id]
    assert any(b.id == batch.id for b in oai.batches.list().data)
    assert oai.files.delete(f.id).deleted
    with pytest.raises(Exception, match="404"):
        oai.files.retrieve(f.id)


def test_responses_batch_equals_online(oai) -> None:
    bodies = [{"model": TINY_NAME, "input": p, "max_output_tokens": 8, "store": False, **GREEDY}
              for p in PROMPTS[:2]]  # fmt: skip
    f = oai.files.create(file=("r.jsonl", _jsonl(
        [_line(f"r{i}", "/v1/responses", b) for i, b in enumerate(bodies)])), purpose="batch")  # fmt: skip
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/responses",
                               completion_window="24h")  # fmt: skip
    done, _ = _wait_batch(oai.batches.retrieve, batch.id, ("completed", "failed"))
    assert done.status == "completed" and done.request_counts.completed == 2, done
    out = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]
    for o, body in zip(out, bodies, strict=True):
        got = o["response"]["body"]
        assert got["object"] == "response" and got["status"] in ("completed", "incomplete")
        assert got["output"][0]["content"][0]["text"] == oai.responses.create(**body).output_text


def test_completions_batch_and_anthropic_batch(cluster, oai) -> None:
    bodies = [{"model": TINY_NAME, "prompt": p, "max_tokens": 10, **GREEDY} for p in PROMPTS[:2]]
    rows = [_line(f"c{i}", "/v1/completions", b) for i, b in enumerate(bodies)]
    f = oai.files.create(file=("c.jsonl", _jsonl(rows)), purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                               completion_window="24h")  # fmt: skip
    claude = anthropic_client(cluster)
    params = [{"model": TINY_NAME, "max_tokens": 10, "temperature": 0,
               "messages": [{"role": "user", "content": p}]} for p in PROMPTS[:3]]  # fmt: skip
    mb = claude.messages.batches.create(
        requests=[{"custom_id": f"m{i}", "params": p} for i, p in enumerate(params)]
    )
    assert mb.processing_status == "in_progress" and mb.request_counts.processing == 3
    ended, _ = _wait_batch(claude.messages.batches.retrieve, mb.id, ("ended",))
    assert ended.request_counts.succeeded == 3 and ended.request_counts.processing == 0
    assert ended.results_url and ended.ended_at
    results = list(claude.messages.batches.results(mb.id))
    assert [r.custom_id for r in results] == ["m0", "m1", "m2"]
    for r, p in zip(results, params, strict=True):
        assert r.result.type == "succeeded"
        assert r.result.message.usage.service_tier == "batch"  # run as offline work
        online = claude.messages.create(
            model=p["model"], max_tokens=p["max_tokens"], messages=p["messages"],
            extra_body={"temperature": 0},
        )  # fmt: skip
        assert r.result.message.content[0].text == online.content[0].text
    assert mb.id in [b.id for b in claude.messages.batches.list(limit=5).data]
    done, _ = _wait_batch(oai.batches.retrieve, batch.id, ("completed", "failed"))
    out = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]
    for o, body in zip(out, bodies, strict=True):
        online = oai.completions.create(**body)
        assert o["response"]["body"]["choices"][0]["text"] == online.choices[0].text


def test_bad_inputs_are_400s(cluster, oai) -> None:
    import anthropic
    import openai

    chat = {"model": TINY_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    good = _line("a", "/v1/chat/completions", chat)
    bad_files = {
        "duplicate_custom_id": [good, good],
        "invalid_method": [_line("a", "/v1/chat/completions", chat, method="GET")],
        "invalid_url": [_line("a", "/v1/embeddings", chat)],
        "invalid_body": [_line("a", "/v1/chat/completions", [1])],  # type: ignore[arg-type]
        "missing_model": [_line("a", "/v1/chat/completions", {"messages": []})],
        "too_many_lines": [
            _line(f"l{i}", "/v1/chat/completions", chat) for i in range(MAX_LINES + 1)
        ],  # fmt: skip
    }
    for code, rows in bad_files.items():
        with pytest.raises(openai.BadRequestError) as exc:
            oai.files.create(file=("bad.jsonl", _jsonl(rows)), purpose="batch")
        assert exc.value.code == code, (code, exc.value)
    for content, code in ((b"not json\n", "invalid_json_line"), (b"\n", "empty_file"),
                          (b"x" * (MAX_FILE_BYTES + 1), "file_too_large")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as exc:
            oai.files.create(file=("bad.jsonl", content), purpose="batch")
        assert exc.value.code == code
    with pytest.raises(openai.BadRequestError, match="purpose"):
        oai.files.create(file=("a.jsonl", _jsonl([good])), purpose="fine-tune")
    f = oai.files.create(file=("ok.jsonl", _jsonl([good])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as exc:
        oai.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                           completion_window="24h")  # fmt: skip
    assert exc.value.code == "mismatched_endpoint"
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                           completion_window="1h")  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                           completion_window="24h")  # fmt: skip
    unknown = _line("a", "/v1/chat/completions", {**chat, "model": "nope"})
    f2 = oai.files.create(file=("m.jsonl", _jsonl([unknown])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as exc:
        oai.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions",
                           completion_window="24h")  # fmt: skip
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        oai.files.content("../../etc/passwd")
    claude = anthropic_client(cluster)
    p = {"model": TINY_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    for reqs in ([], [{"custom_id": "bad id!", "params": p}],
                 [{"custom_id": "a", "params": p}, {"custom_id": "a", "params": p}],
                 [{"custom_id": "a", "params": {"model": TINY_NAME}}]):  # fmt: skip
        with pytest.raises(anthropic.BadRequestError) as aexc:
            claude.messages.batches.create(requests=reqs)  # type: ignore[arg-type]
        assert aexc.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.batches.retrieve("msgbatch_nope")


def _cli(url: str, *args: str) -> subprocess.CompletedProcess:
    """`epdserve batches ARGS` against the router at ``url``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "batches", *args, "--router", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cli_lists_gets_and_cancels(cluster, oai) -> None:
    # NOTE: long enough (40 x 480 tokens, 2 at a time) to still run when the CLI cancels it.
    body = {"model": TINY_NAME, "max_tokens": 480, "ignore_eos": True, "prompt": "x"}
    rows = [_line(f"q{i}", "/v1/completions", body) for i in range(MAX_LINES)]
    f = oai.files.create(file=("q.jsonl", _jsonl(rows)), purpose="batch")
    b = oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    mb = anthropic_client(cluster).messages.batches.create(
        requests=[
            {
                "custom_id": "one",
                "params": {
                    "model": TINY_NAME,
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "x"}],
                },
            }
        ]
    )
    url = cluster.base_urls[0]
    r = _cli(url, "cancel", b.id)
    assert r.returncode == 0 and r.stdout.strip() == f"batch {b.id}: cancelling", r.stderr
    listed = json.loads(_cli(url, "list", "--json").stdout)
    by_id = {x["id"]: x for x in listed}
    assert by_id[b.id]["api"] == "openai" and by_id[b.id]["total"] == MAX_LINES
    assert by_id[mb.id]["api"] == "anthropic" and by_id[mb.id]["endpoint"] == "/v1/messages"
    _wait_batch(oai.batches.retrieve, b.id, ("cancelled",))
    got = json.loads(_cli(url, "get", b.id, "--json").stdout)
    assert got["id"] == b.id and got["status"] == "cancelled"
    assert b.id in _cli(url, "list").stdout  # the table
    r = _cli(url, "cancel", b.id)
    assert r.returncode == 1 and "400" in r.stderr and "cancelled" in r.stderr
    r = _cli(url, "get", "batch_nope")
    assert r.returncode == 1 and "404" in r.stderr


def _leader(cluster) -> int | None:
    """Index of the router that leads (and so runs the batches), if exactly one does."""
    auth = {"Authorization": f"Bearer {cluster.admin_token}"}
    leads = [get_json(u + "/admin/status", headers=auth)[1]["rebalancer"]["leader"]
             for u in cluster.base_urls]  # fmt: skip
    return leads.index(True) if leads.count(True) == 1 else None


LINE_TOKENS = 100


def test_cancel_then_kill_9_of_the_router_running_a_batch(cluster, oai) -> None:
    # NOTE: 40 x 100 tokens, 2 at a time: several seconds of work on the tiny model (the kill
    # comes after 3 lines, with 37 to go; each line costs the survivor time, not the check).
    body = {"model": TINY_NAME, "max_tokens": LINE_TOKENS, "ignore_eos": True, **GREEDY}
    rows = [_line(f"k{i}", "/v1/completions", {**body, "prompt": f"Count {i}:"})
            for i in range(MAX_LINES)]  # fmt: skip
    # Cancel: the batch ends cancelled, with what finished before in its output.
    f = oai.files.create(file=("k.jsonl", _jsonl(rows)), purpose="batch")
    b = oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert oai.batches.cancel(b.id).status == "cancelling"
    cancelled, _ = _wait_batch(oai.batches.retrieve, b.id, ("cancelled",))
    assert cancelled.request_counts.completed < MAX_LINES and cancelled.cancelled_at
    with pytest.raises(Exception, match="400"):
        oai.batches.cancel(b.id)
    # kill -9 of the leader mid-batch: the other router takes over and finishes it.
    deadline = time.monotonic() + 30
    while (leader := _leader(cluster)) is None:
        assert time.monotonic() < deadline, "no single leader"
        time.sleep(0.2)
    survivor = 1 - leader
    oai2 = openai_client_at(cluster.base_urls[survivor])
    ran_before = _completions_served(cluster.base_urls[survivor])
    b = oai2.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                            completion_window="24h")  # fmt: skip
    deadline = time.monotonic() + 120
    while oai2.batches.retrieve(b.id).request_counts.completed < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    running = oai2.batches.retrieve(b.id)
    counts_at_kill = running.request_counts  # NOTE: counts move while the batch runs
    assert running.status == "in_progress" and counts_at_kill.total == MAX_LINES
    cluster.routers[leader].signal(signal.SIGKILL)
    cluster.routers[leader].proc.wait(timeout=10)
    assert counts_at_kill.completed < MAX_LINES, "the batch ended before the kill"
    done, _ = _wait_batch(oai2.batches.retrieve, b.id, ("completed", "failed"), timeout=180)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (MAX_LINES, 0)
    out = [json.loads(x) for x in oai2.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(r["custom_id"] for r in rows)
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == LINE_TOKENS for o in out)
    # Lines counted before the kill were on disk then: the survivor never ran them again.
    ran = _completions_served(cluster.base_urls[survivor]) - ran_before
    assert 0 < ran <= MAX_LINES - counts_at_kill.completed


def _completions_served(url: str) -> int:
    """/v1/completions requests this router answered 200 (its batch lines included)."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    prefix = 'epdserve:router_requests_total{api="completions",outcome="success"}'
    return int(float(next(ln for ln in text.splitlines() if ln.startswith(prefix)).split()[-1]))


def openai_client_at(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=60, max_retries=0)
