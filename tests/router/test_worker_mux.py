"""GenerateMux (RouterConfig.worker_mux): a worker's Generate calls as requests on one shared
stream behave as the calls they replace: the same messages, statuses and failure kinds,
cancel and deadline abort the request on the worker, and a broken stream fails its requests
as a dead worker's (UNAVAILABLE, no failure kind). Real gRPC server and channel, fake engine."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
import pytest_asyncio
from mux_fakes import Worker, gen_request, outcome
from router_fakes import FakeEngine, start_fake_worker, start_gateway

from services.router.routing.mux import MuxCall
from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


@pytest_asyncio.fixture
async def worker():
    w = Worker()
    await w.start()
    yield w
    await w.stop()


async def test_same_messages_and_statuses_as_a_call_each(worker: Worker) -> None:
    cases = [gen_request("ok", 3), gen_request("stale", 2, epoch=7), gen_request("", 0)]
    for req in cases:
        plain = await outcome(worker.plain.stub.Generate(req, timeout=10))
        muxed = worker.muxed.stub.Generate(req, timeout=10)
        assert isinstance(muxed, MuxCall)
        assert await outcome(muxed) == plain
        assert await muxed.code() == (grpc.StatusCode.OK if plain[1] is None else plain[1][0])
    # the stale epoch is a refusal with its failure kind, as on a call of its own
    stale = await outcome(worker.muxed.stub.Generate(cases[1], timeout=10))
    assert stale[1][0] == grpc.StatusCode.FAILED_PRECONDITION and stale[1][2] == "refused"


async def test_many_requests_share_one_stream(worker: Worker) -> None:
    calls = [worker.muxed.stub.Generate(gen_request(f"r{i}", 4), timeout=10) for i in range(20)]
    outs = await asyncio.gather(*(outcome(c) for c in calls))
    assert all(err is None and len(msgs) == 4 for msgs, err in outs)
    assert worker.streams == 1
    # the frames of requests with output at the same time travel as one message
    assert worker.frames == 20 * 4 and worker.sends < worker.frames
    assert not worker.state.inflight


async def test_cancel_and_deadline_abort_on_the_worker(worker: Worker) -> None:
    worker.engine.step_s = 0.05
    call = worker.muxed.stub.Generate(gen_request("c", 100), timeout=10)
    await call.__anext__()
    assert call.cancel() and call.cancelled() and not call.cancel()
    late = worker.muxed.stub.Generate(gen_request("d", 100), timeout=0.3)
    msgs, err = await outcome(late)
    assert msgs and err is not None and err[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if {"c", "d"} <= set(worker.engine.aborted) and not worker.state.inflight:
            break
        await asyncio.sleep(0.05)
    assert {"c", "d"} <= set(worker.engine.aborted)
    assert not worker.state.inflight
    # the stream itself lives on
    assert (await outcome(worker.muxed.stub.Generate(gen_request("e", 2), timeout=10)))[1] is None
    assert worker.streams == 1


async def test_a_broken_stream_fails_its_requests_as_died(worker: Worker) -> None:
    worker.engine.step_s = 0.05
    calls = [worker.muxed.stub.Generate(gen_request(f"b{i}", 100), timeout=10) for i in range(3)]
    for c in calls:
        await c.__anext__()
    await worker.server.stop(grace=None)  # the worker dies under the stream
    for c in calls:
        msgs, err = await asyncio.wait_for(outcome(c), 10)
        assert err is not None and err[0] == grpc.StatusCode.UNAVAILABLE
        assert err[2] is None and err[3], "a broken stream is a death, which migration takes"
    # the next request tries a new stream (and fails as the worker is gone)
    msgs, err = await asyncio.wait_for(
        outcome(worker.muxed.stub.Generate(gen_request("n"), timeout=5)), 10
    )
    assert err is not None and err[0] == grpc.StatusCode.UNAVAILABLE


async def test_closing_the_handle_ends_its_stream(worker: Worker) -> None:
    # What the pool does when a worker leaves membership (or the router stops): the channel's
    # close ends the shared stream, its requests fail as died and the worker aborts them.
    worker.engine.step_s = 0.05
    call = worker.muxed.stub.Generate(gen_request("x", 100), timeout=10)
    await call.__anext__()
    await worker.muxed.close()
    msgs, err = await asyncio.wait_for(outcome(call), 10)
    assert err is not None and err[0] == grpc.StatusCode.UNAVAILABLE and err[3]
    await until(lambda: "x" in worker.engine.aborted and not worker.state.inflight,
                what="the worker aborted the request")  # fmt: skip
    assert worker.streams == 1


async def test_gateway_with_mux_fails_over_and_aborts(etcd) -> None:
    """Through the HTTP gateway: requests run, a client gone aborts on the worker, and a dead
    worker's requests go to the other."""
    w1 = await start_fake_worker(etcd.endpoint, "mux1", "w1", FakeEngine())
    w2 = await start_fake_worker(etcd.endpoint, "mux1", "w2", FakeEngine())
    gw = await start_gateway(etcd.endpoint, "mux1", policy="round_robin", worker_mux=True)
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            await until(lambda: len(gw.gateway.pool.candidates()) == 2, what="two usable workers")
            req = {"model": "fake-model", "prompt": "a", "max_tokens": 2}
            for _ in range(4):
                r = await c.post("/v1/completions", json=req)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == "w0 w1 "
            assert w1.engine.started and w2.engine.started
            w1.engine.step_s = w2.engine.step_s = 0.05
            slow = {**req, "max_tokens": 100, "stream": True}
            for _ in range(2):  # round robin: one stream on each worker
                async with c.stream("POST", "/v1/completions", json=slow) as r:
                    async for _line in r.aiter_lines():
                        break
            for _ in range(100):
                if len(w1.engine.aborted) + len(w2.engine.aborted) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(w1.engine.aborted) + len(w2.engine.aborted) == 2
            w1.engine.step_s = w2.engine.step_s = 0.002
            await w1.server.stop(grace=None)  # dies without deregistering
            n2 = len(w2.engine.started)
            for _ in range(6):
                assert (await c.post("/v1/completions", json=req)).status_code == 200
            # NOTE: at least, not exactly: on a loaded machine (load ~30) a request may be
            # retried once more on w2 (user7 saw n2 + 7); what matters is that all six were
            # served with w1 dead, so by w2.
            assert len(w2.engine.started) >= n2 + 6
    finally:
        await gw.stop()
        await w2.stop()
        await w1.registrar.stop(deregister=False)
