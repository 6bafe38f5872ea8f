"""GenerateMux beyond the mixed path's Generate: PD Decode on the shared stream, flow control
per request (a reader that stops pauses its own request only, nothing is dropped), and the
frames that come late, twice or for an ended request. Real gRPC server and channel, fake
engine (mux_fakes.Worker)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import pytest
import pytest_asyncio
from mux_fakes import Worker, gen_request, outcome

from services.common.proto import worker_pb2 as pb
from services.router.routing import mux
from services.router.routing.mux import MuxCall
from services.worker.mux import MAX_BATCH_BYTES
from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


@pytest_asyncio.fixture
async def worker():
    w = Worker(step_s=0.001, max_model_len=4096)
    await w.start()
    yield w
    await w.stop()


@pytest_asyncio.fixture
async def decode_worker():
    w = Worker(step_s=0.001, role="decode")
    await w.start()
    yield w
    await w.stop()


async def test_pd_decode_goes_on_the_stream_as_its_call_would(decode_worker: Worker) -> None:
    w = decode_worker
    outcomes = []
    for stub in (w.plain.stub, w.muxed.stub):
        await stub.Reserve(pb.ReserveRequest(request_id="d1", role_epoch=1), timeout=5)
        call = stub.Decode(pb.DecodeRequest(request_id="d1", role_epoch=1), timeout=10)
        ok = await outcome(call)
        # no reservation (never made, or already claimed): NOT_FOUND, not a death
        gone = await outcome(stub.Decode(pb.DecodeRequest(request_id="d1"), timeout=10))
        outcomes.append((ok, gone, type(call)))
    (plain_ok, plain_gone, plain_type), (mux_ok, mux_gone, mux_type) = outcomes
    assert mux_type is MuxCall and plain_type is not MuxCall
    assert mux_ok == plain_ok and mux_ok[1] is None and len(mux_ok[0]) == 3
    assert mux_gone == plain_gone and mux_gone[1][0] == grpc.StatusCode.NOT_FOUND
    assert w.streams == 1 and not w.state.inflight


async def test_a_reader_that_stops_pauses_its_own_request_only(worker: Worker) -> None:
    """A slow HTTP client's request holds at most WINDOW messages in the router, the others on
    the stream run on, and once it reads again it gets every message, in order."""
    n = 3 * mux.WINDOW
    slow = worker.muxed.stub.Generate(gen_request("slow", n), timeout=30)
    await slow.__anext__()
    # the worker stops at the window: it sent WINDOW messages the router has not granted
    await until(lambda: len(slow._messages) >= mux.WINDOW - 1, timeout=20, what="window full")
    others = [worker.muxed.stub.Generate(gen_request(f"o{i}", 20), timeout=30) for i in range(4)]
    outs = await asyncio.wait_for(asyncio.gather(*(outcome(c) for c in others)), 20)
    assert all(err is None and len(msgs) == 20 for msgs, err in outs)
    # meanwhile the slow one did not grow: bounded by the window, not by its output
    assert len(slow._messages) <= mux.WINDOW and not slow.done()
    msgs, err = await asyncio.wait_for(outcome(slow), 20)
    assert err is None
    tokens = [t for m in msgs for ids, _ in m for t in ids]
    assert tokens == list(range(101, 100 + n)), "nothing dropped, nothing out of order"
    assert worker.streams == 1 and not worker.state.inflight


async def test_late_repeated_and_stray_frames_change_nothing(worker: Worker) -> None:
    """On one raw stream: a start sent twice runs once, also when the second comes after
    the request ended; a cancel or credit for an ended request, or for one that never was,
    is ignored; the stream goes on."""
    out: asyncio.Queue[Any] = asyncio.Queue()

    async def frames() -> Any:
        while (frame := await out.get()) is not None:
            yield frame

    call = worker.plain.stub.GenerateMux(frames())
    got: dict[int, list[Any]] = {}

    async def until_end(i: int) -> pb.MuxEnd:
        async for batch in call:
            for f in batch.frames:
                got.setdefault(f.id, []).append(f)
            if any(f.HasField("end") for f in got.get(i, ())):
                return next(f.end for f in got[i] if f.HasField("end"))
        raise AssertionError("the stream ended")

    start = pb.MuxRequest(id=1, start=gen_request("a", 2), window=4)
    out.put_nowait(start)
    out.put_nowait(start)  # twice
    assert (await asyncio.wait_for(until_end(1), 10)).code == 0
    for stray in (start, pb.MuxRequest(id=1, cancel=True), pb.MuxRequest(id=1, credit=9),
                  pb.MuxRequest(id=77, cancel=True), pb.MuxRequest(id=78, credit=3)):  # fmt: skip
        out.put_nowait(stray)
    out.put_nowait(pb.MuxRequest(id=2, start=gen_request("b", 3)))
    assert (await asyncio.wait_for(until_end(2), 10)).code == 0
    assert worker.engine.started.count("a") == 1 and len(got[1]) == 2 and len(got[2]) == 3
    out.put_nowait(None)
    call.cancel()


async def test_cancels_racing_the_ends_leave_no_request_behind(worker: Worker) -> None:
    """Cancels at every moment of short requests, end included: each call ends once, the
    worker holds nothing afterwards, and the stream serves on."""
    rnd = random.Random(7)
    calls = [worker.muxed.stub.Generate(gen_request(f"c{i}", rnd.randint(1, 4)), timeout=10)
             for i in range(60)]  # fmt: skip

    async def race(c: MuxCall) -> None:
        await asyncio.sleep(rnd.random() * 0.01)
        c.cancel()
        await c.code()  # ended, whichever came first

    await asyncio.wait_for(asyncio.gather(*(race(c) for c in calls)), 20)
    await until(lambda: not worker.state.inflight, timeout=10, what="no request left")
    assert all(c.done() for c in calls)
    ok = await outcome(worker.muxed.stub.Generate(gen_request("after", 2), timeout=10))
    assert ok[1] is None and worker.streams == 1


async def test_a_stalled_router_holds_back_each_request_at_its_window(worker: Worker) -> None:
    """256 requests with logprobs on one stream whose router reads nothing for a while: the
    worker's backlog is each request's window, not all their output (which, unbounded, could
    pass gRPC's message limit and fail the stream: review6 §5), and each message of frames
    stays within the cap. With credits, all of them end OK."""
    out: asyncio.Queue[Any] = asyncio.Queue()

    async def frames() -> Any:
        while (frame := await out.get()) is not None:
            yield frame

    n, tokens, window = 256, 24, 8
    for i in range(1, n + 1):
        out.put_nowait(
            pb.MuxRequest(id=i, start=gen_request(f"s{i}", tokens, logprobs=5), window=window)
        )
    call = worker.plain.stub.GenerateMux(frames())
    seen: dict[int, int] = {}
    ended: set[int] = set()
    biggest = 0
    grant = False

    async def read() -> None:
        # NOTE: one reader for the whole test: cancelling a grpc.aio read cancels the call.
        nonlocal biggest
        async for batch in call:
            biggest = max(biggest, batch.ByteSize())
            for f in batch.frames:
                seen[f.id] = seen.get(f.id, 0) + f.HasField("message")
                if f.HasField("end"):
                    assert f.end.code == 0
                    ended.add(f.id)
                elif grant and seen[f.id] % window == 0:
                    out.put_nowait(pb.MuxRequest(id=f.id, credit=seen[f.id]))
            if len(ended) == n:
                return

    await asyncio.sleep(1.0)  # the router stalls
    reader = asyncio.create_task(read())  # then reads without granting: a window of each
    await until(lambda: sum(seen.values()) >= n * window, timeout=20, what="the windows")
    await asyncio.sleep(0.5)
    assert sum(seen.values()) == n * window and not ended
    grant = True
    for i in range(1, n + 1):
        out.put_nowait(pb.MuxRequest(id=i, credit=window))
    await asyncio.wait_for(reader, 30)
    assert seen == {i: tokens for i in range(1, n + 1)}
    assert biggest <= MAX_BATCH_BYTES + 64 * 1024
    out.put_nowait(None)
    call.cancel()


async def test_a_finished_request_s_end_goes_out_before_its_handler_s_cleanup() -> None:
    """The finished message and the end (one frame) are handed to the stream's writer as
    soon as the handler yields that message, before the handler runs on to its end (its
    cleanup: ~27 us a request on the response's path, measured). The router's relay ends
    with that message and reads no status after it (routing/retry.py)."""
    from services.worker.mux import MuxRPCs, _Run

    class Servicer(MuxRPCs):
        def __init__(self) -> None:
            self.cleanup = asyncio.Event()
            self.cleaned = False

        async def Generate(self, request: Any, context: Any) -> Any:  # noqa: N802
            yield pb.GenerateResponse(finished=True)
            await self.cleanup.wait()  # the handler's work after its last message
            self.cleaned = True

    servicer, outbox = Servicer(), asyncio.Queue()
    frame = pb.MuxRequest(id=1, start=pb.GenerateRequest(request_id="r"), window=8)
    task = asyncio.create_task(servicer._mux_one(frame, outbox, _Run(8)))
    try:
        out = await asyncio.wait_for(outbox.get(), 10)
    finally:
        servicer.cleanup.set()
    await task
    assert out.id == 1 and out.message.finished and out.HasField("end") and out.end.code == 0
    assert servicer.cleaned and outbox.empty()  # nothing more for the request
