"""The Responses API over fake workers, a real etcd and two routers: stored responses are
shared by both routers (GET, DELETE, previous_response_id), expire with their TTL, large ones
as files of the shared batch directory (swept once expired); background runs and their cancel
from either router;
the event stream's order; bad input as OpenAI's 400s."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import pytest_asyncio
from router_fakes import (
    FakeEngine,
    gateway_with_worker,
    start_fake_worker,
    start_gateway,
    until_healthy,
)

from services.common.etcd_client import ETCD_OP_TIMEOUT_S
from services.common.etcd_server import EtcdServer
from services.common.proto import worker_pb2 as pb
from services.router import response_store
from services.router.accumulate import Choice, Usage
from services.router.api.protocol.common import OpenAIError
from services.router.api.protocol.responses import ResponseDeleted, ResponseObject
from services.router.api.responses_output import ResponsesOutput
from services.router.errors import APIError
from services.router.features.tool_parsers.forced import JsonArrayParser
from services.router.response_store import ResponseStore
from services.router.serving import ServeRequest

pytestmark = [pytest.mark.timeout(120)]

MODEL = "fake-model"
# How long a background run's running mark must outlive a stall of its router's renewals (an
# etcd stopped 20 s, docs/faults.md; a loaded router's loop).
MARK_STALL_S = 20.0
UNFINISHED = ("queued", "in_progress")


@pytest_asyncio.fixture
async def routers(tmp_path, request):
    with EtcdServer() as etcd:
        worker = await start_fake_worker(etcd.endpoint, "rs", "w1", engine=FakeEngine(step_s=0.02))
        # Router b keeps records of at most 2000 bytes in etcd (larger ones: files of the
        # shared batch directory); both expire them after 3 s, or after the TTL a test gives
        # (indirect parametrization: {"response_ttl_s": S}).
        shared = {"response_ttl_s": 3.0, "batch_dir": str(tmp_path),
                  **getattr(request, "param", {})}  # fmt: skip
        a = await start_gateway(etcd.endpoint, "rs", **shared)
        b = await start_gateway(etcd.endpoint, "rs", response_max_record_bytes=2000, **shared)
        try:
            async with (
                httpx.AsyncClient(base_url=a.url, timeout=10) as ca,
                httpx.AsyncClient(base_url=b.url, timeout=10) as cb,
            ):
                for c in (ca, cb):
                    await until_healthy(c)
                yield ca, cb, etcd
        finally:
            await asyncio.wait_for(a.stop(), 15)
            await asyncio.wait_for(b.stop(), 15)
            await asyncio.wait_for(worker.stop(), 15)


async def _create(c: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await c.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 3, **body})
    assert r.status_code == 200, r.text
    return ResponseObject.model_validate(r.json()).model_dump()


# NOTE: a TTL longer than the test (records made at its start are read at its end: at load
# 45-50 that took over the fixture's 3 s, and DELETE found nothing). Expiry: the next test.
@pytest.mark.parametrize("routers", [{"response_ttl_s": 120.0}], indirect=True, ids=["ttl120"])
@pytest.mark.asyncio
async def test_stored_responses_are_shared(routers, tmp_path) -> None:
    a, b, _ = routers
    first = await _create(a, input="hi", instructions="be brief", metadata={"k": "v"})
    assert first["status"] == "incomplete" and first["output"][0]["content"][0]["text"]
    assert first["usage"]["output_tokens"] == 3 and first["metadata"] == {"k": "v"}
    got = await b.get(f"/v1/responses/{first['id']}")
    assert got.status_code == 200 and got.json() == first
    # The next turn, on the other router, continues the stored conversation: its prompt
    # holds the earlier input and output (the fake tokenizer counts characters).
    second = await _create(b, input="more", previous_response_id=first["id"])
    alone = await _create(b, input="more")
    assert second["usage"]["input_tokens"] > alone["usage"]["input_tokens"] + 10
    assert second["previous_response_id"] == first["id"]
    deleted = await b.delete(f"/v1/responses/{first['id']}")
    assert ResponseDeleted.model_validate(deleted.json()).deleted
    for c in (a, b):
        missing = await c.get(f"/v1/responses/{first['id']}")
        assert missing.status_code == 404
        assert OpenAIError.model_validate(missing.json()).error.param == "response_id"
    assert (await a.delete(f"/v1/responses/{first['id']}")).status_code == 404
    # Its input items, paged.
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "c"}]}]  # fmt: skip
    third = await _create(a, input=turns)
    url = f"/v1/responses/{third['id']}/input_items"
    r = await b.get(url, params={"order": "asc", "limit": 2})
    assert r.status_code == 200, (r.status_code, r.text)
    page = r.json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["a", "b"] and page["has_more"]
    rest = (await b.get(url, params={"order": "asc", "after": page["last_id"]})).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["c"] and not rest["has_more"]
    newest = (await b.get(url)).json()  # desc by default, as OpenAI's
    assert [i["content"][0]["text"] for i in newest["data"]] == ["c", "b", "a"]
    for limit in (0, "\u00b2"):  # "²" is a digit to str.isdigit, not to int(): was a 500
        assert (await b.get(url, params={"limit": limit})).status_code == 400
    assert first["service_tier"] == "default"
    assert (await _create(a, input="x", store=False, service_tier="flex"))["service_tier"] == "flex"
    unstored = await _create(a, input="x", store=False, stop=["w1"])  # vLLM's extension
    assert unstored["output"][0]["content"][0]["text"] == "w0 "
    assert (await a.get(f"/v1/responses/{unstored['id']}")).status_code == 404
    # Large records (b: over 2000 bytes) are files of the batch directory with a pointer in
    # etcd: both routers read, continue and delete them.
    assert (await a.get(f"/v1/responses/{alone['id']}")).status_code == 200
    large = {f"k{i}": "v" * 200 for i in range(16)}
    big = await _create(b, input="y", metadata=large)
    files = tmp_path / "responses"
    assert (files / f"{big['id']}.json").is_file()
    for c in (a, b):
        got = await c.get(f"/v1/responses/{big['id']}")
        assert got.status_code == 200 and got.json() == big
    on_a = await _create(a, input="more", previous_response_id=big["id"])
    assert on_a["usage"]["input_tokens"] > alone["usage"]["input_tokens"] + 10
    doomed = await _create(b, input="z", metadata=large)
    assert (await a.delete(f"/v1/responses/{doomed['id']}")).status_code == 200
    assert (await b.get(f"/v1/responses/{doomed['id']}")).status_code == 404
    assert not (files / f"{doomed['id']}.json").exists()
    r = await a.post("/v1/responses", json={"model": MODEL, "input": "x",
                                            "previous_response_id": first["id"]})  # fmt: skip
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


@pytest.mark.asyncio
async def test_stored_responses_expire(routers, tmp_path) -> None:
    """Records (in etcd, and a large one as a file with a pointer) expire with the TTL (3 s);
    a sweep then deletes the files of the expired ones."""
    a, b, etcd = routers
    alone = await _create(a, input="x")
    big = await _create(b, input="y", metadata={f"k{i}": "v" * 200 for i in range(16)})
    files = tmp_path / "responses"
    assert (files / f"{big['id']}.json").is_file()
    store = ResponseStore([etcd.endpoint], "rs", 3.0, 2000, 100, 1000, files)
    try:
        assert await store.sweep(older_than_s=0) == 0  # its pointer lives
        gone: set[int] = set()
        for _ in range(300):  # 3 s, or longer on a loaded machine; at most 30 s
            gone = {(await c.get(f"/v1/responses/{rid}")).status_code
                    for rid, c in ((alone["id"], a), (big["id"], b), (big["id"], a))}  # fmt: skip
            if gone == {404}:
                break
            await asyncio.sleep(0.1)
        assert gone == {404}
        assert await store.sweep(older_than_s=0) == 1
        assert not any(files.iterdir())
    finally:
        await store.close()
    r = await a.post("/v1/responses", json={"model": MODEL, "input": "x",
                                            "previous_response_id": alone["id"]})  # fmt: skip
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


async def _status(c: httpx.AsyncClient, rid: str, want: str) -> str:
    """The stored status of ``rid`` once it is ``want`` (or its last after 10 s)."""
    for _ in range(100):
        status = (await c.get(f"/v1/responses/{rid}")).json()["status"]
        if status == want:
            break
        await asyncio.sleep(0.1)
    return status


async def _finished(c: httpx.AsyncClient, rid: str) -> dict[str, Any]:
    """The stored response ``rid`` once it is no longer queued or in progress (or after 10 s)."""
    for _ in range(100):
        done = (await c.get(f"/v1/responses/{rid}")).json()
        if done["status"] not in ("queued", "in_progress"):
            break
        await asyncio.sleep(0.1)
    return done


@pytest.mark.asyncio
async def test_background_runs_and_cancels_from_either_router(routers) -> None:
    a, b, _ = routers
    queued = await _create(a, input="go", background=True, max_output_tokens=4)
    assert queued["status"] == "queued" and queued["background"]
    done = await _finished(b, queued["id"])
    assert done["status"] == "incomplete" and done["usage"]["output_tokens"] == 4
    # Queued, it fits router b's etcd bound (2000 bytes); done, it is a file: the other
    # router finds that, not a stale "queued" copy.
    grown = await _create(b, input="go", background=True, max_output_tokens=4,
                          metadata={f"k{i}": "v" * 200 for i in range(6)})  # fmt: skip
    assert (await a.get(f"/v1/responses/{grown['id']}")).json()["status"] in UNFINISHED
    for _ in range(100):
        if (await b.get(f"/v1/responses/{grown['id']}")).json()["status"] == "incomplete":
            break
        await asyncio.sleep(0.1)
    assert (await a.get(f"/v1/responses/{grown['id']}")).json()["status"] == "incomplete"
    # A long run (100 steps of 20 ms) is in progress once admitted, as both routers say, and
    # is cancelled through the router that does not run it.
    long = await _create(a, input="go", background=True, max_output_tokens=100)
    assert await _status(b, long["id"], "in_progress") == "in_progress"
    assert (await a.get(f"/v1/responses/{long['id']}")).json()["status"] == "in_progress"
    r = await b.post("/v1/responses", json={"model": MODEL, "input": "x",
                                            "previous_response_id": long["id"]})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    cancelled = await b.post(f"/v1/responses/{long['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    await asyncio.sleep(2.5)  # the runner looks every second; it stopped without output
    after = (await a.get(f"/v1/responses/{long['id']}")).json()
    assert after["status"] == "cancelled" and after["output"] == []
    plain = await _create(a, input="x")
    r = await a.post(f"/v1/responses/{plain['id']}/cancel")
    assert r.status_code == 400
    r = await a.post("/v1/responses/resp_nope/cancel")
    assert r.status_code == 404


@pytest.mark.parametrize("routers", [{"max_queued_tokens": 1}], indirect=True, ids=["tiny"])
@pytest.mark.asyncio
async def test_a_background_run_refused_by_admission_fails_as_rate_limited(routers) -> None:
    """A background run the router's admission refuses (429) ends ``failed`` with OpenAI's
    ``rate_limit_exceeded``: a client can tell it from a crash (``server_error``) and retry."""
    a, _, _ = routers
    long = await _create(a, input="go", background=True, max_output_tokens=100)
    assert await _status(a, long["id"], "in_progress") == "in_progress"  # holds the admission
    refused = await _finished(a, (await _create(a, input="go too", background=True))["id"])
    assert refused["status"] == "failed", refused
    assert refused["error"]["code"] == "rate_limit_exceeded", refused["error"]
    await a.post(f"/v1/responses/{long['id']}/cancel")


@pytest.mark.asyncio
async def test_a_background_run_whose_router_died_fails_with_the_reason(routers, tmp_path) -> None:
    """A router killed (-9) leaves its background runs' records unfinished; their running
    marks (on a lease that router renewed) run out, and the first reader then stores the run
    as failed, with the reason. Before, the record stayed `queued` for its TTL (1 h by
    default): through `epdserve up`, a client polled a killed router's run for 2 min. Here the
    dead router's leftover is written by hand: its record as stored, and no mark."""
    a, b, etcd = routers
    ran = await _finished(b, (await _create(a, input="go", background=True))["id"])
    store = ResponseStore([etcd.endpoint], "rs", 30.0, 2000, 100, 1000, tmp_path / "responses")
    try:
        record = await store.get(ran["id"])
        assert record is not None
        left = {**record["response"], "id": "resp_left", "status": "in_progress", "output": []}
        await store.put("resp_left", {**record, "response": left})
    finally:
        await store.close()
    for c in (b, a):
        got = (await c.get("/v1/responses/resp_left")).json()
        assert got["status"] == "failed", got
        assert "stopped before it finished" in got["error"]["message"]
    # A live run, asked through the router that does not run it, is left alone.
    long = await _create(a, input="go", background=True, max_output_tokens=100)
    assert (await b.get(f"/v1/responses/{long['id']}")).json()["status"] in UNFINISHED
    assert (await b.post(f"/v1/responses/{long['id']}/cancel")).json()["status"] == "cancelled"


class _Clock:
    """``time`` as response_store.py sees it, its monotonic clock set by the test."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.asyncio
async def test_a_running_mark_outlives_a_stall_of_its_router(tmp_path, monkeypatch) -> None:
    """A live run must not be judged failed because its router's renewals stalled a while (its
    loop busy, etcd slow or stopped 20 s: docs/faults.md). Each renewal may put the mark on a
    lease granted a little earlier (one lease for all the router's marks); after the oldest
    such renewal the mark must still live MARK_STALL_S. It lived 6.7 s (a 10 s lease reused up
    to 3.3 s old) while renewals come ~4 s apart: a stall of ~3 s let another router store a
    live run as failed (and the run later overwrote that with its result)."""
    clock = _Clock()
    monkeypatch.setattr(response_store, "time", clock)
    with EtcdServer() as etcd:
        store = ResponseStore([etcd.endpoint], "rs", 30.0, 2000, 100, 1000, tmp_path / "r")
        try:
            await store.mark_running("resp_first")
            assert store._run_lease is not None
            lease, oldest = store._run_lease[0], 0.0
            for step in range(1, 200):  # the oldest age at which a renewal reuses the lease
                clock.now += 0.1
                await store.mark_running(f"resp_{step}")
                if store._run_lease[0] != lease:
                    break
                oldest = 0.1 * step

            async def ttl(c: Any) -> int:
                return (await c.lease.time_to_live(lease, timeout=ETCD_OP_TIMEOUT_S)).grantedTTL

            granted = await store.session.call(ttl)
        finally:
            await store.close()
    assert granted - oldest >= MARK_STALL_S, (granted, oldest)


@pytest.mark.asyncio
async def test_stream_events_in_order(routers) -> None:
    a, _, _ = routers
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 3, "stream": True}
    events = []
    async with a.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * 3,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete",
    ]  # fmt: skip
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = ResponseObject.model_validate(events[-1]["response"])
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert final.output[0].content[0].text == text == events[7]["text"]  # type: ignore[union-attr]
    stored = await a.get(f"/v1/responses/{final.id}")
    assert stored.json() == events[-1]["response"]


async def _events(c: httpx.AsyncClient, body: dict[str, Any], keep: int = 1000) -> list[dict]:
    """The first ``keep`` events of a streamed response (then the client leaves)."""
    events = []
    async with c.stream("POST", "/v1/responses", json={"model": MODEL, **body}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == keep:
                    break
    return events


@pytest.mark.asyncio
async def test_background_streams_and_runs_on_without_its_client(routers) -> None:
    a, b, _ = routers
    body = {"input": "hi", "max_output_tokens": 3, "stream": True, "background": True}
    events = await _events(a, body)
    assert [e["type"] for e in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["background"] and final["usage"]["output_tokens"] == 3
    assert (await b.get(f"/v1/responses/{final['id']}")).json() == final
    # The client leaves after the first event: the run goes on and is stored.
    first = (await _events(a, {**body, "max_output_tokens": 20}, keep=1))[0]["response"]
    done = await _finished(b, first["id"])
    assert done["status"] == "incomplete" and done["usage"]["output_tokens"] == 20


@pytest.mark.asyncio
async def test_logprobs_streamed_and_not(routers) -> None:
    a, _, _ = routers
    body = await _create(a, input="x", store=False, top_logprobs=1,
                         include=["message.output_text.logprobs"])  # fmt: skip
    lps = body["output"][0]["content"][0]["logprobs"]
    assert [round(lp["logprob"], 4) for lp in lps] == [-0.1] * 3
    assert [len(lp["top_logprobs"]) for lp in lps] == [1] * 3
    assert (await _create(a, input="x", store=False))["output"][0]["content"][0]["logprobs"] == []
    events = []
    req = {"model": MODEL, "input": "x", "max_output_tokens": 3, "stream": True,
           "top_logprobs": 1, "store": False}  # fmt: skip
    async with a.stream("POST", "/v1/responses", json=req) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    streamed = [lp for e in events if e["type"] == "response.output_text.delta"
                for lp in e["logprobs"]]  # fmt: skip
    assert streamed == lps == events[-1]["response"]["output"][0]["content"][0]["logprobs"]


# NOTE: a TTL longer than the test: at load 30-50 the outage and etcd's return took 5-10 s,
# and router a's memory copy, 3 s old, had expired before the last GET (404 instead of 200).
@pytest.mark.parametrize("routers", [{"response_ttl_s": 120.0}], indirect=True, ids=["ttl120"])
@pytest.mark.asyncio
async def test_etcd_away_keeps_responses_local(routers) -> None:
    a, b, etcd = routers
    etcd.stop()
    try:
        made = await _create(a, input="x")  # stored in a's memory once etcd fails
        assert (await a.get(f"/v1/responses/{made['id']}")).status_code == 200
        r = await b.get(f"/v1/responses/{made['id']}")
        assert r.status_code == 503 and OpenAIError.model_validate(r.json())
    finally:
        etcd.start()
    for _ in range(50):  # etcd back: b reads it again (a 404: the record is a's alone)
        r = await b.get(f"/v1/responses/{made['id']}")
        if r.status_code != 503:
            break
        await asyncio.sleep(0.2)
    assert r.status_code == 404
    assert (await a.get(f"/v1/responses/{made['id']}")).status_code == 200


BAD = [
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input"),
    # Not a string: a dict or list role was looked up in a dict (TypeError, a 500).
    ({"input": [{"role": ["user"], "content": "x"}]}, "input"),
    ({"input": [{"role": {"a": 1}, "content": "x"}]}, "input"),
    # Item ids page GET .../input_items ('after'): a repeated one sent an SDK's auto-paging
    # round the same items for ever, a non-string one was listed as it came.
    (
        {"input": [{"role": "user", "content": "a", "id": "m"}, {"type": "reasoning", "id": "m"}]},
        "input",
    ),
    ({"input": [{"role": "user", "content": "a", "id": 5}]}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "background": True, "store": False}, "background"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata"),
    ({"input": "x", "top_k": -5}, "top_k"),
    ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "x", "service_tier": "gold"}, "service_tier"),
]


@pytest.mark.asyncio
async def test_bad_input_is_400(routers) -> None:
    for body, param in BAD:
        r = await routers[0].post("/v1/responses", json={"model": MODEL, **body})
        assert r.status_code == 400, (body, r.text)
        assert OpenAIError.model_validate(r.json()).error.param == param, (body, r.text)


@pytest.mark.asyncio
async def test_reasoning_item_with_a_reasoning_parser() -> None:
    # DeepSeek-R1's output is reasoning until </think>: here, all of the fake engine's text.
    async with (
        gateway_with_worker("rr", reasoning_parser="deepseek_r1") as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=10) as c,
    ):
        body = await _create(c, input="think", store=False)
        assert [i["type"] for i in body["output"]] == ["reasoning"]
        assert body["output"][0]["content"][0]["text"] == "w0 w1 w2 "
        events = []
        async with c.stream("POST", "/v1/responses", json={
            "model": MODEL, "input": "think", "max_output_tokens": 3, "stream": True,
        }) as r:  # fmt: skip
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    assert "".join(deltas) == "w0 w1 w2 "
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "w0 w1 w2 "
    assert not any(e["type"].startswith("response.output_text") for e in events)


def test_error_after_the_stream_started_is_error_then_response_failed() -> None:
    req = ServeRequest("responses", "resp_1", MODEL, [[1]], [], pb.SamplingParams(), 1, False,
                       None, JsonArrayParser, None, 0.0)  # fmt: skip
    out = ResponsesOutput(req, {}, [], None)
    step = [(Choice(0), pb.CompletionDelta(index=0, text="partial"))]
    started = [ev for ev in out.step(step, Usage()) if ev]  # type: ignore[arg-type]
    assert len(started) == 5  # created, in_progress, item added, part added, delta
    events = [
        json.loads(chunk.split("data: ", 1)[1])
        for chunk in out.error_event(APIError(503, "worker lost")).split("\n\n") if chunk
    ]  # fmt: skip
    assert [e["type"] for e in events] == ["error", "response.failed"]
    assert [e["sequence_number"] for e in events] == [5, 6]
    assert events[0]["code"] == "server_error" and events[0]["message"] == "worker lost"
    failed = events[1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "worker lost"
