"""A stream whose only worker of its role dies waits, bounded (``restart_wait_s``), for that
worker to be restarted and goes on there from its tokens, as a migration does; past the bound
it fails with a clear 503."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest
from fake_handles import fake_handle, fake_pool, keep_reporting, rpc_error

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.routing.orchestrator import Orchestrator
from services.router.routing.policies.factory import create_policy
from services.router.routing.workers import WorkerHandle, WorkerPool


def delta(token: int, done: bool = False) -> pb.GenerateResponse:
    d = pb.CompletionDelta(token_ids=[token], text=f"<{token}>",
                           finish_reason="length" if done else "")  # fmt: skip
    return pb.GenerateResponse(outputs=[d], finished=done)


class DiesMidStream:
    """Generate streams tokens 5 and 6, then the process dies (UNAVAILABLE)."""

    def Generate(self, req: pb.GenerateRequest, timeout: float):  # noqa: N802
        async def stream():
            yield delta(5)
            yield delta(6)
            await asyncio.sleep(0.01)
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")

        return Call(stream())


class Continues:
    """The restarted process: continues a resumed request with token 8 and finishes."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []

    def Generate(self, req: pb.GenerateRequest, timeout: float):  # noqa: N802
        self.requests.append(req)

        async def stream():
            yield delta(8, done=True)

        return Call(stream())


class Call:
    def __init__(self, gen) -> None:
        self._gen = gen

    def __aiter__(self):
        return self._gen

    def cancel(self) -> None:
        pass


def restarted(old: WorkerHandle, stub: Continues) -> WorkerHandle:
    """The same worker id as a new process (a new incarnation), as `epdserve up` restarts it."""
    h = fake_handle(old.id, stub)
    h.info = dataclasses.replace(old.info, incarnation="i2")
    return h


async def run(orch: Orchestrator) -> list[list[int]]:
    params = pb.SamplingParams(max_tokens=3)
    return [list(m.outputs[0].token_ids) async for m in orch.generate("m", "r1", [1, 2], params)]


async def restart_later(pool: WorkerPool, old: WorkerHandle, new: WorkerHandle, expire: bool,
                        delay: float) -> None:  # fmt: skip
    """``old`` dies: its etcd key expires (``expire``) or stays until the new process
    registers; ``delay`` s later the restarted process joins and reports."""
    while old.failed_at == 0:  # the call failed: the router saw it die
        await asyncio.sleep(0.01)
    if expire:
        pool.on_membership({})
    await asyncio.sleep(delay)
    pool.handles[new.id] = new
    await keep_reporting([new])


def orchestrator(pool: WorkerPool, restart_wait_s: float) -> Orchestrator:
    orch = Orchestrator(pool, create_policy("round_robin"), timeout_s=30.0, max_attempts=3,
                        restart_wait_s=restart_wait_s)  # fmt: skip
    orch.WORKER_WAIT_S = 0.2  # the short wait for a listed worker, past which it used to fail
    return orch


@pytest.mark.parametrize("expire", [True, False], ids=["key-expired", "key-still-listed"])
def test_the_stream_resumes_on_the_restarted_worker(expire: bool) -> None:
    async def main() -> None:
        old, stub = fake_handle("w0", DiesMidStream()), Continues()
        pool = fake_pool([old])
        task = asyncio.create_task(restart_later(pool, old, restarted(old, stub), expire, 0.8))
        try:
            out = await run(orchestrator(pool, restart_wait_s=30.0))
        finally:
            task.cancel()
        assert out == [[5], [6], [8]]  # nothing lost or repeated
        (req,) = stub.requests
        assert list(req.resume.output_token_ids) == [5, 6]  # continued from its tokens
        assert req.resume.emitted_chars == len("<5><6>")
        assert req.request_id == "r1-m1"

    asyncio.run(main())


@pytest.mark.parametrize("expire", [True, False], ids=["key-expired", "key-still-listed"])
def test_without_the_wait_the_stream_fails_at_once(expire: bool) -> None:
    """restart_wait_s 0: the old behaviour (a no_workers 503 although `up` restarts it)."""

    async def main() -> None:
        old = fake_handle("w0", DiesMidStream())
        pool = fake_pool([old])
        task = asyncio.create_task(
            restart_later(pool, old, restarted(old, Continues()), expire, 0.8)
        )
        try:
            with pytest.raises(APIError) as err:
                await run(orchestrator(pool, restart_wait_s=0.0))
        finally:
            task.cancel()
        assert err.value.code == "no_workers"

    asyncio.run(main())


def test_past_the_bound_it_is_a_clear_503() -> None:
    async def main() -> None:
        old = fake_handle("w0", DiesMidStream())
        pool = fake_pool([old])
        task = asyncio.create_task(restart_later(pool, old, old, True, 60.0))  # never back
        started = time.monotonic()
        try:
            with pytest.raises(APIError) as err:
                await run(orchestrator(pool, restart_wait_s=1.0))
        finally:
            task.cancel()
        assert err.value.status == 503 and err.value.code == "no_workers"
        assert "died" in err.value.message and "2 tokens" in err.value.message, err.value.message
        assert 1.0 <= time.monotonic() - started < 10.0

    asyncio.run(main())


def test_a_worker_that_left_on_purpose_is_not_waited_for() -> None:
    async def main() -> None:
        old = fake_handle("w0", DiesMidStream())
        old.load = pb.LoadReport(draining=True)
        pool = fake_pool([old])
        pool.on_membership({})
        assert pool.lost.since("mixed", "m") == float("inf")
        started = time.monotonic()
        with pytest.raises(APIError):
            await run(orchestrator(pool, restart_wait_s=30.0))
        assert time.monotonic() - started < 5.0

    asyncio.run(main())


def test_a_request_arriving_while_the_worker_restarts_waits_for_it() -> None:
    """Its etcd key already expired: the pool is empty, the lost worker is remembered."""

    async def main() -> None:
        old, stub = fake_handle("w0", DiesMidStream()), Continues()
        pool = fake_pool([old])
        old.mark_failed()  # the process died: its load stream broke
        pool.on_membership({})
        assert pool.handles == {} and pool.lost.models(30.0) == {"m": 4096}
        orch = orchestrator(pool, restart_wait_s=30.0)
        assert orch.path_coming("m", 0.0) and not orch.path_coming("other", 0.0)
        task = asyncio.create_task(restart_later(pool, old, restarted(old, stub), False, 0.5))
        try:
            out = await run(orch)
        finally:
            task.cancel()
        assert out == [[8]] and stub.requests[0].request_id == "r1"

    asyncio.run(main())


def test_a_request_timeout_shorter_than_the_wait_ends_it_with_the_wait_left() -> None:
    """The wait for a restart is bounded by the request's timeout too, and its 503 says in
    Retry-After when the restart wait runs out (it waited the whole restart wait, with a
    constant Retry-After of 1 s)."""

    async def main() -> None:
        old = fake_handle("w0", DiesMidStream())
        pool = fake_pool([old])
        old.mark_failed()  # the process died: its load stream broke
        pool.on_membership({})
        orch = orchestrator(pool, restart_wait_s=30.0)
        orch.timeout_s = 1.0
        started = time.monotonic()
        with pytest.raises(APIError) as err:
            await run(orch)
        assert time.monotonic() - started < 10.0
        assert err.value.status == 503 and err.value.code == "no_workers"
        assert 20 <= int(err.value.headers["Retry-After"]) <= 29, err.value.headers

    asyncio.run(main())


class DiesAtOnce:
    """Generate: the process dies before its first message (UNAVAILABLE), and its load
    stream breaks (``handle`` out of routing)."""

    handle: WorkerHandle

    def Generate(self, req: pb.GenerateRequest, timeout: float):  # noqa: N802
        async def stream():
            await asyncio.sleep(0.01)
            self.handle.mark_failed()
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            yield  # an async generator

        return Call(stream())


def test_a_request_whose_worker_died_before_its_first_token_goes_to_the_restart() -> None:
    """The restarted worker keeps the dead one's id: the request tried that process, not it
    (it was excluded by id, and the request failed once the wait passed)."""

    async def main() -> None:
        old, stub = fake_handle("w0", DiesAtOnce()), Continues()
        old.stub.handle = old
        pool = fake_pool([old])
        task = asyncio.create_task(restart_later(pool, old, restarted(old, stub), True, 0.5))
        try:
            out = await run(orchestrator(pool, restart_wait_s=30.0))
        finally:
            task.cancel()
        assert out == [[8]] and not stub.requests[0].HasField("resume")

    asyncio.run(main())


def test_a_worker_that_stalled_and_came_back_by_itself_is_tried_again() -> None:
    """Its only worker hung on the request (its etcd key expired too) and came back as the
    same process: no restart will come for it, so the request goes there again instead of
    waiting out the restart wait for a 503 (review8's loop of test_structured_outputs: a
    prefill worker stalled 5.1 s, back 1 s later, the request failed after 60 s)."""

    async def main() -> None:
        old, stub = fake_handle("w0", DiesAtOnce()), Continues()
        old.stub.handle = old
        pool = fake_pool([old])
        same = fake_handle("w0", stub)  # the same process, registered and reporting again
        assert same.process == old.process
        task = asyncio.create_task(restart_later(pool, old, same, True, 0.3))
        try:
            out = await run(orchestrator(pool, restart_wait_s=8.0))
        finally:
            task.cancel()
        assert out == [[8]] and stub.requests[0].request_id == "r1"

    asyncio.run(main())


@pytest.mark.parametrize("wait_s", [30.0, 0.0])
def test_the_gateway_accepts_a_model_whose_only_worker_is_restarting(wait_s: float) -> None:
    """No worker of it is listed (its key expired): with the wait on, the gateway resolves
    the model (its context length remembered) and the request waits in the orchestrator; off,
    the old 503 at once."""
    from router_fakes import FakeTokenizer

    from services.router.config import RouterConfig
    from services.router.gateway import Gateway

    async def main() -> None:
        cfg = RouterConfig(etcd="127.0.0.1:1", worker_restart_wait_s=wait_s)
        gw = Gateway(cfg, FakeTokenizer())
        gw.pool.lost.record("mixed", ["m"], 4096)
        if wait_s:
            assert gw.resolve_model("m") == ("m", 4096)
        else:
            with pytest.raises(APIError) as err:
                gw.resolve_model("m")
            assert err.value.code == "no_workers"
        with pytest.raises(APIError) as err:
            gw.resolve_model("other")  # never served: not waited for
        assert err.value.status == (404 if wait_s else 503)

    asyncio.run(main())


@pytest.mark.parametrize("wait_s", [30.0, 0.0])
def test_models_lists_a_model_whose_only_worker_is_restarting(wait_s: float) -> None:
    """/v1/models lists what the gateway serves: with the wait on, a model whose only worker
    is restarting (requests wait for it) is listed, so `epdserve bench` and SDK clients that
    read the list first do not fail with an empty list; off, it is gone as before."""
    import json

    from router_fakes import FakeTokenizer

    from services.router.api.models import list_models, retrieve_model
    from services.router.config import RouterConfig
    from services.router.gateway import Gateway

    async def main() -> None:
        cfg = RouterConfig(etcd="127.0.0.1:1", worker_restart_wait_s=wait_s)
        gw = Gateway(cfg, FakeTokenizer())
        gw.pool.lost.record("mixed", ["m"], 4096)
        listed = json.loads((await list_models(gw, None)).body)  # type: ignore[arg-type]
        assert [c["id"] for c in listed["data"]] == (["m"] if wait_s else [])
        if wait_s:
            assert listed["data"][0]["max_model_len"] == 4096

            class Req:
                path_params = {"model_id": "m"}

            card = json.loads((await retrieve_model(gw, Req())).body)  # type: ignore[arg-type]
            assert card["id"] == "m"

    asyncio.run(main())
