"""The first message of a request is timed by its worker's queue, not by the stall timeout:
a busy worker whose load stream is alive keeps the request; a silent one loses it."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from fake_handles import Stream, fake_handle, fake_pool, finished, keep_reporting

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.routing.orchestrator import Orchestrator
from services.router.routing.policies.factory import create_policy
from services.router.routing.workers import WorkerHandle

STALL_S = 0.3  # the stall timeout of these tests
STALE_S = 2.0  # a worker whose load stream is silent this long is lost


class FakeStub:
    """Generate answers one finished message after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls: list[pb.GenerateRequest] = []

    def Generate(self, req: pb.GenerateRequest, timeout: float) -> Stream:  # noqa: N802
        self.calls.append(req)
        return Stream([finished(prompt_tokens=len(req.prompt_token_ids))], self.delay)


def handle(iid: str, delay: float, load: pb.LoadReport, rate: float) -> WorkerHandle:
    return fake_handle(iid, FakeStub(delay), load=load, rate=rate, stale_s=STALE_S)


async def run(handles: list[WorkerHandle], alive: list[WorkerHandle]) -> list[pb.GenerateResponse]:
    orch = Orchestrator(
        fake_pool(handles, STALE_S), create_policy("round_robin"), timeout_s=30.0,
        max_attempts=3, stall_timeout_s=STALL_S,
    )  # fmt: skip
    reporter = asyncio.create_task(keep_reporting(alive))
    try:
        params = pb.SamplingParams(max_tokens=1)
        return [m async for m in orch.generate("m", "r1", list(range(100)), params)]
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        for h in handles:
            await h.channel.close()


# 1000 prompt tokens queued ahead, 100 of its own, at 1000 tokens/s: 1.1 s expected.
BUSY = pb.LoadReport(num_waiting=4, num_waiting_prompt_tokens=1000, num_running=2)


def test_busy_alive_worker_keeps_a_request_past_the_stall_timeout() -> None:
    async def main() -> None:
        w = handle("w0", delay=1.0, load=BUSY, rate=1000.0)  # > STALL_S, < 4 x 1.1 s
        out = await run([w], alive=[w])
        assert [m.outputs[0].token_ids for m in out] == [[7]]
        assert len(w.stub.calls) == 1  # not cancelled and queued again
        assert w.reachable()

    asyncio.run(main())


def test_busy_worker_without_a_measured_rate_gets_the_safety_factor() -> None:
    async def main() -> None:
        w = handle("w0", delay=1.0, load=BUSY, rate=0.0)
        out = await run([w], alive=[w])
        assert len(out) == 1 and len(w.stub.calls) == 1
        assert w.prefill_rate.best() > 0  # the first message measured it

    asyncio.run(main())


def test_silent_busy_worker_is_lost_and_the_request_goes_elsewhere() -> None:
    async def main() -> None:
        silent = handle("w0", delay=60.0, load=BUSY, rate=100.0)  # its deadline: 44 s
        other = handle("w1", delay=0.0, load=pb.LoadReport(), rate=1000.0)
        started = time.monotonic()
        out = await run([silent, other], alive=[other])
        assert len(out) == 1
        assert len(silent.stub.calls) == 1 and len(other.stub.calls) == 1
        assert not silent.reachable()  # taken out of routing
        # Lost when its load stream went silent, not at the long first-message deadline.
        assert time.monotonic() - started < 20.0

    asyncio.run(main())


def test_idle_alive_worker_that_never_answers_is_lost_after_its_deadline() -> None:
    async def main() -> None:
        # Nothing queued: 100 tokens at 1000/s -> 0.4 s with the safety factor.
        w = handle("w0", delay=30.0, load=pb.LoadReport(), rate=1000.0)
        assert w.first_message_s(100, STALL_S) == pytest.approx(0.4)
        with pytest.raises(APIError) as err:
            await run([w], alive=[w])
        assert err.value.status == 503

    asyncio.run(main())


def test_first_message_deadline_follows_the_queue() -> None:
    async def main() -> None:
        w = handle("w0", delay=0.0, load=BUSY, rate=1000.0)
        assert w.first_message_s(100, STALL_S) == pytest.approx(4 * 1.1)
        assert w.first_message_s(100, 60.0) == 60.0  # never below the stall timeout
        w.load = None
        assert w.first_message_s(100, STALL_S) == STALL_S
        await w.channel.close()

    asyncio.run(main())
