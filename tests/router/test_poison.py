"""Poison requests: a request that failed on a healthy worker because of itself is not sent to
another worker, and one that workers keep dying on is stopped (and its identical retries
refused) instead of taking down the next worker, and the next.

Before: the router sent a request whose engine step raised on to the next worker (the step
thread and the worker had died, the router saw UNAVAILABLE before any token), and the next;
a request that failed on a worker with INTERNAL was retried on another PD pair."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

import grpc
import httpx
import pytest
import pytest_asyncio
from fake_handles import (
    Stream,
    Unary,
    fake_handle,
    fake_pool,
    finished,
    keep_reporting,
    rpc_error,
)
from router_fakes import FakeEngine, start_fake_worker, start_gateway, until_healthy

from services.cli import admin
from services.common.proto import worker_pb2 as pb
from services.engine.async_engine import EngineDeadError
from services.engine.outputs import RequestFailedError
from services.router.errors import APIError
from services.router.routing.orchestrator import Orchestrator
from services.router.routing.poison import Placements, PoisonTracker
from services.router.routing.policies.factory import create_policy
from services.router.routing.streams import merge_streams
from services.router.routing.workers import WorkerHandle, WorkerPool
from tests.waits import until

pytestmark = [pytest.mark.timeout(60)]

FAILS, DIES = 1001, 1002  # seeds that make the fake engine fail the request / die of it
DIES_LATER = 1003  # a seed that kills the engine after the request's first output


class PoisonableEngine(FakeEngine):
    """A FakeEngine on which seed 1001 fails the request alone (as the real engine does when
    processing one request raises) and seed 1002 kills the engine (EngineDeadError)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int | None] = []

    async def generate(self, request_id, prompt_token_ids, params, resume=None, lora=None):
        self.seen.append(params.seed)
        if params.seed == FAILS:
            raise RequestFailedError("the engine failed sampling its next token: boom")
        if params.seed == DIES:
            raise EngineDeadError("engine died: boom")
        async for out in super().generate(request_id, prompt_token_ids, params, resume):
            yield out
            if params.seed == DIES_LATER:
                raise EngineDeadError("engine died mid-stream: boom")


# ---- the tracker alone ------------------------------------------------------------------------


def test_a_request_is_stopped_at_its_second_dead_worker() -> None:
    t = PoisonTracker(max_deaths=2)
    r = t.admit("fp")
    t.note_death(r, "w1")
    t.note_death(r, "w1")  # the same worker again (hung, then died) counts once
    with pytest.raises(Exception, match="running on 2 workers") as err:
        t.note_death(r, "w2")
    assert err.value.code == "poison_request" and err.value.status == 500
    with pytest.raises(Exception, match="identical to this one"):
        t.admit("fp")  # a client's retry of the same request
    t.admit("other")  # other requests are not affected


def test_a_popular_request_is_not_blocked_by_unrelated_deaths() -> None:
    """Workers restarted one by one kill whatever runs on them, a popular prompt included:
    deaths of a small share of its requests do not make it poison."""
    t = PoisonTracker(max_deaths=2)
    for i in range(20):
        r = t.admit("popular")
        if i in (3, 11):
            t.note_death(r, f"w{i}")
    t.admit("popular")


def test_one_death_under_many_identical_requests_is_one_death() -> None:
    """A load generator's fixed prompt in flight five times on the worker that is killed,
    then on another killed worker: victims, never judged (session 18's CI: these deaths were
    summed over the requests and the prompt was refused on the router for good)."""
    t = PoisonTracker(max_deaths=2)
    for victim in ("w1", "w2"):
        running = [t.admit("load") for _ in range(5)]
        for r in running:
            t.note_placement(r, victim)
            t.note_death(r, victim)
    t.admit("load")


def test_workers_that_die_together_are_one_death() -> None:
    """A PD pair lost with its node (or a decode worker failing after its prefill died) is
    one death of the request's; a worker it goes to after that and that dies is the second."""
    t = PoisonTracker(max_deaths=2)
    r = t.admit("fp")
    t.note_placement(r, "decode-1")
    t.note_placement(r, "prefill-1")
    t.note_death(r, "prefill-1")
    t.note_death(r, "decode-1")  # placed before the first death: died with it
    t.note_placement(r, "decode-1")  # placed again: still its first placement counts
    t.note_placement(r, "prefill-2")
    with pytest.raises(Exception, match="running on 2 workers"):
        t.note_death(r, "prefill-2")


def test_a_worker_silent_when_the_request_got_there_is_no_death_of_its() -> None:
    """Two workers frozen together (session 20: a stopped mooncake_master froze the mixed and
    the decode worker; a node's SIGSTOP does the same): a request moved off the first one goes
    to the second while the router still lists it, seconds into its silence. That death is not
    the request's: it is not poison, nor are its retries refused. The old tracker counted
    two deaths and refused the prompt for 10 minutes."""
    now = [100.0]
    t = PoisonTracker(max_deaths=2, frozen_s=2.5, clock=lambda: now[0])
    r = t.admit("probe")
    t.note_placement(r, "w1")  # both answer at 100.0, then freeze
    now[0] = 105.3  # w1's load stream is 5 s silent: hung, the request moves to w2
    t.note_death(r, "w1", alive_at=100.0)
    t.note_placement(r, "w2")
    now[0] = 105.5
    t.note_death(r, "w2", alive_at=100.1)  # silent for 5.2 s when the request got there
    assert r.deaths == 1
    t.admit("probe")  # a retry is served
    t.note_placement(r, "w3")  # a worker that answers when it gets the request: a death
    with pytest.raises(APIError, match="running on 2 workers"):
        t.note_death(r, "w3", alive_at=105.4)


def test_a_silent_worker_that_answered_again_and_died_of_the_request_counts() -> None:
    """A worker that was silent when the request got there but answered since (its stall
    passed), then died with the request on it: that death may be the request's."""
    now = [100.0]
    t = PoisonTracker(max_deaths=1, frozen_s=2.5, clock=lambda: now[0])
    r = t.admit("fp")
    t.note_placement(r, "w1")  # silent since 96.0
    now[0] = 104.0
    t.note_death(r, "w1", alive_at=96.0)  # still silent: not counted
    with pytest.raises(APIError, match="running on 1 workers"):
        t.note_death(r, "w1", alive_at=102.0)  # it reported at 102.0, then died


def test_memory_of_deaths_expires() -> None:
    now = [0.0]
    t = PoisonTracker(max_deaths=1, ttl_s=10, clock=lambda: now[0])
    with pytest.raises(Exception, match="poison|workers"):
        t.note_death(t.admit("fp"), "w1")
    with pytest.raises(Exception, match="identical"):
        t.admit("fp")
    now[0] = 11.0
    t.admit("fp")


def test_a_refusal_says_until_when_and_an_operator_lifts_it() -> None:
    """The poison error's Retry-After is when identical requests are served again (none when
    they are not refused: a popular prompt); ``forget`` serves them at once."""
    now = [0.0]
    t = PoisonTracker(max_deaths=1, ttl_s=600, clock=lambda: now[0])
    with pytest.raises(APIError) as err:
        t.note_death(t.admit("fp"), "w1")
    assert err.value.headers == {"x-should-retry": "false", "Retry-After": "600"}
    now[0] = 100.5
    with pytest.raises(APIError, match="retry it in 500 s") as err:
        t.admit("fp")
    assert err.value.headers["Retry-After"] == "500"
    assert t.refusals() == {"fp": 499.5}
    assert t.forget("other") == 0 and t.forget("fp") == 1
    t.admit("fp")
    for _ in range(3):
        t.admit("popular")
    with pytest.raises(APIError) as err:
        t.note_death(t.admit("popular"), "w1")  # 1 of 4 judged: not refused
    assert err.value.headers == {"x-should-retry": "false"}, err.value.headers
    assert t.forget() == 0
    t.admit("popular")


def test_entries_are_bounded() -> None:
    t = PoisonTracker(max_entries=100)
    for i in range(1000):
        t.admit(f"fp{i}")
    assert len(t._seen) == 100


class DyingStub:
    """A worker that dies (UNAVAILABLE, no failure kind) of whatever it is sent; ``killed``
    counts the deaths of all the stubs sharing it."""

    def __init__(
        self, killed: list[str], name: str, on_death: Callable[[], None] = lambda: None
    ) -> None:
        self.killed, self.name, self.on_death = killed, name, on_death

    def _dies(self) -> grpc.aio.AioRpcError:
        self.killed.append(self.name)
        self.on_death()
        return rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")

    def Encode(self, req: pb.EncodeRequest, timeout: float) -> Unary:  # noqa: N802
        async def answer() -> pb.EncodeResponse:
            raise self._dies()

        return Unary(answer)

    def Generate(self, req: pb.GenerateRequest, timeout: float) -> DyingStub:  # noqa: N802
        return self

    def __aiter__(self) -> DyingStub:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        raise self._dies()

    def cancel(self) -> None:
        pass


def test_an_image_that_kills_encoders_kills_two_workers_in_all() -> None:
    """EPD: the encoders a request's image is sent to and the workers it then goes to
    count together: the request stops at the second worker it killed. The encode stage
    counted no death: two encoders died of the image, then two mixed workers encoding it
    themselves (four workers)."""
    killed: list[str] = []

    async def main() -> None:
        handles = [fake_handle(f"e{i}", DyingStub(killed, f"e{i}"), role="encode")
                   for i in range(3)]  # fmt: skip
        handles += [fake_handle(f"m{i}", DyingStub(killed, f"m{i}")) for i in range(3)]
        orch = Orchestrator(fake_pool(handles), create_policy("round_robin"), timeout_s=30,
                            max_attempts=3, stall_timeout_s=5)  # fmt: skip
        image = pb.ImageData(data=b"png", hash="img", grid_thw=[1, 2, 2])
        try:
            with pytest.raises(APIError) as err:
                params = pb.SamplingParams(max_tokens=1)
                _ = [m async for m in orch.generate("m", "r1", [1, 2], params, [image])]
            assert err.value.code == "poison_request", err.value.message
        finally:
            for h in handles:
                await h.channel.close()

    asyncio.run(main())
    assert len(killed) == 2, killed


def test_a_worker_that_was_silent_when_the_request_came_is_not_counted() -> None:
    """Through the orchestrator: the second worker tried has sent no load report for 3 s
    (frozen, not yet out of routing) when the request gets there. Its failure is not the
    request's death: the request stops at the second live worker it killed (3 tried). It
    stopped at the frozen one (2 tried)."""
    killed: list[str] = []
    handles: list[WorkerHandle] = []

    def pool() -> WorkerPool:
        handles.extend(fake_handle(f"m{i}", DyingStub(killed, f"m{i}")) for i in range(3))
        handles[2].load_at -= 3.0  # round robin tries m0, m2, m1
        return fake_pool(handles)

    _ends_poison(pool, handles)
    assert sorted(killed) == ["m0", "m1", "m2"], killed


class GoneStub(DyingStub):
    """A worker gone before the call got there: it fails to connect (the details as a shared
    stream's failure relays them, mux.py: seen with two workers SIGKILLed at once)."""

    def _dies(self) -> grpc.aio.AioRpcError:
        self.killed.append(self.name)
        return rpc_error(
            grpc.StatusCode.UNAVAILABLE,
            "the shared stream to the worker broke: UNAVAILABLE failed to connect to all "
            "addresses; last error: UNKNOWN: ipv4:127.0.0.1:38357: Failed to connect to remote "
            "host: Connection refused",
        )


def test_a_worker_the_call_could_not_connect_to_is_not_counted() -> None:
    """Two workers killed at once (a host's OOM killer, an etcd outage that ends workers): a
    request moved off the first reaches the second before the router read that one's load
    stream break, and the call fails to connect. The request never got there: not its death.
    It was the second death (poison_request in 3 of 3 rounds of a real 3-worker cluster with
    two workers killed at once under 6 streams)."""
    killed: list[str] = []
    handles: list[WorkerHandle] = []

    def pool() -> WorkerPool:
        stubs = [DyingStub(killed, "m0"), DyingStub(killed, "m1"), GoneStub(killed, "m2")]
        handles.extend(fake_handle(f"m{i}", stub) for i, stub in enumerate(stubs))
        return fake_pool(handles)  # round robin tries m0, m2, m1

    _ends_poison(pool, handles)
    assert killed == ["m0", "m2", "m1"], killed


class Answers:
    """A live worker: it answers a request with one finished token."""

    def Generate(self, req: pb.GenerateRequest, timeout: float) -> Stream:  # noqa: N802
        return Stream([finished()])


def test_after_a_death_the_request_goes_to_a_worker_that_reported_since() -> None:
    """Two workers SIGKILLed at once: the request moved off the first one must not go to the
    second before the router saw it close (80 ms later in a real cluster: a second death,
    poison_request, in 1 of 1 such rounds). It waits a report interval or two for a worker
    that reported since the death, and goes there. The old choice (round robin: m2, silent
    since before the death) made it poison."""
    killed: list[str] = []

    async def main() -> None:
        handles = [fake_handle("m0", DyingStub(killed, "m0")), fake_handle("m1", Answers()),
                   fake_handle("m2", DyingStub(killed, "m2"))]  # fmt: skip
        reporting = asyncio.create_task(keep_reporting(handles[1:2]))  # m1 only
        orch = Orchestrator(fake_pool(handles), create_policy("round_robin"), timeout_s=30,
                            max_attempts=3, stall_timeout_s=5)  # fmt: skip
        try:
            params = pb.SamplingParams(max_tokens=1)
            out = [m async for m in orch.generate("m", "r1", [1, 2], params)]
            assert out[-1].finished
        finally:
            reporting.cancel()
            for h in handles:
                await h.channel.close()

    asyncio.run(main())
    assert killed == ["m0"], killed


def _ends_poison(pool: Callable[[], WorkerPool], handles: list[WorkerHandle]) -> None:
    """One request on an Orchestrator over ``pool()`` (made in the event loop) must end
    poison_request; ``handles`` (those made by then) are closed after."""

    async def main() -> None:
        orch = Orchestrator(pool(), create_policy("round_robin"), timeout_s=30, max_attempts=3,
                            stall_timeout_s=5)  # fmt: skip
        try:
            with pytest.raises(APIError) as err:
                params = pb.SamplingParams(max_tokens=1)
                _ = [m async for m in orch.generate("m", "r1", [1, 2], params)]
            assert err.value.code == "poison_request", err.value.message
        finally:
            for h in handles:
                await h.channel.close()

    asyncio.run(main())


def test_a_worker_restarted_under_its_id_that_dies_again_is_a_second_death() -> None:
    """The one worker of a model, restarted by its supervisor (the same id, a new process)
    each time the request kills it: the request stops at the second death. Deaths were
    known by worker id, so the restarted process's death was the first one again and the
    request killed the worker once per attempt (3)."""
    killed: list[str] = []
    handles: list[WorkerHandle] = []
    workers = fake_pool([])

    def start(n: int) -> None:
        h = fake_handle("m0", DyingStub(killed, f"m0@{n}", lambda: start(n + 1)))
        h.info.incarnation = f"i{n}"
        handles.append(h)
        workers.handles[h.id] = h

    def pool() -> WorkerPool:
        start(0)
        return workers

    _ends_poison(pool, handles)
    assert killed == ["m0@0", "m0@1"]


class DiesAfterFirst(DyingStub):
    """A worker that streams one token of each of a request's ``n`` completions, then dies."""

    def Generate(self, req: pb.GenerateRequest, timeout: float) -> _ThenDies:  # noqa: N802
        outs = [pb.CompletionDelta(index=i, token_ids=[5], text="a") for i in range(req.params.n)]
        return _ThenDies(self, pb.GenerateResponse(outputs=outs))


class _ThenDies:
    def __init__(self, stub: DyingStub, first: pb.GenerateResponse) -> None:
        self.stub, self.first = stub, first

    def __aiter__(self) -> _ThenDies:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        first, self.first = self.first, None
        if first is None:
            raise self.stub._dies()
        return first

    def cancel(self) -> None:
        pass


class DiesWithOthers(DyingStub):
    """A worker that dies of what it is sent (``killed`` names it when it is sent), once
    ``placed`` is set: those placed at once are all running when the first dies."""

    def __init__(self, killed: list[str], name: str, wave: int, placed: asyncio.Event) -> None:
        super().__init__(killed, name)
        self.wave, self.placed = wave, placed

    def Generate(self, req: pb.GenerateRequest, timeout: float) -> DyingStub:  # noqa: N802
        self.killed.append(self.name)
        if len(self.killed) >= self.wave:
            self.placed.set()
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        await self.placed.wait()
        await asyncio.sleep(0)  # the first wave's deaths are all seen before a retry's
        raise rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")


def _kill_all(
    workers: Callable[[], list[WorkerHandle]], *requests: tuple[list[int], pb.SamplingParams]
) -> None:
    """Runs ``requests`` (prompt, params) together as one client request's prompts, on an
    Orchestrator over the handles ``workers()`` makes; they must end poison_request."""

    async def main() -> None:
        handles = workers()
        orch = Orchestrator(fake_pool(handles), create_policy("round_robin"), timeout_s=30,
                            max_attempts=3, stall_timeout_s=5)  # fmt: skip
        placements = Placements()
        streams = [orch.generate("m", f"r-{i}", prompt, params, placements=placements)
                   for i, (prompt, params) in enumerate(requests)]  # fmt: skip
        try:
            with pytest.raises(APIError) as err:
                _ = [m async for m in merge_streams(streams)]
            assert err.value.code == "poison_request", err.value.message
        finally:
            for h in handles:
                await h.channel.close()

    asyncio.run(main())


def test_n_completions_that_kill_their_workers_kill_two_in_all() -> None:
    """n = 4 on one mixed worker that dies after the first token: the four completions then
    go on elsewhere, but one at a time until one got its first token, so the request stops
    at the second worker it killed. They were placed on four workers at once, which all
    died of it (five workers)."""
    killed: list[str] = []

    def workers() -> list[WorkerHandle]:
        return [fake_handle("m0", DiesAfterFirst(killed, "m0"))] + [
            fake_handle(f"m{i}", DyingStub(killed, f"m{i}")) for i in range(1, 6)
        ]

    _kill_all(workers, ([1, 2], pb.SamplingParams(max_tokens=4, n=4)))
    assert len(killed) == 2, killed


def test_the_prompts_of_one_request_that_kill_their_workers_kill_one_more() -> None:
    """A completions request of three prompts, each killing the worker it runs on: the
    three placed at once die together, then their retries go one at a time, and the first
    of them to die stops the request (four workers). Each prompt was retried at once on
    its own (six workers)."""
    killed: list[str] = []

    def workers() -> list[WorkerHandle]:
        placed = asyncio.Event()
        return [fake_handle(f"m{i}", DiesWithOthers(killed, f"m{i}", 3, placed)) for i in range(7)]

    params = pb.SamplingParams(max_tokens=1)
    _kill_all(workers, ([1, 2], params), ([3, 4], params), ([5, 6], params))
    assert len(killed) == 4, killed


# ---- through a gateway and two workers ----------------------------------------------------------


TOKEN = "poison-admin"


@pytest_asyncio.fixture(params=[2])
async def env(etcd, request, tmp_path):
    engines = [PoisonableEngine() for _ in range(request.param)]
    workers = [await start_fake_worker(etcd.endpoint, "poison", f"w{i}", e)
               for i, e in enumerate(engines)]  # fmt: skip
    token = tmp_path / "token"
    token.write_text(TOKEN)
    # NOTE: the router's default load_stale_s (5 s), not router_fakes' 1 s: a worker silent
    # for half of it when a request gets there was frozen already (its death is not counted),
    # and this process stalls for 0.5 s at a load of 25 (the fake workers with it).
    gw = await start_gateway(etcd.endpoint, "poison", admin_token_file=str(token),
                             load_stale_s=5.0)  # fmt: skip
    async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
        await until_healthy(client)
        await until(lambda: len(gw.gateway.pool.candidates("mixed", "fake-model")) == len(engines),
                    what="both workers usable")  # fmt: skip
        yield client, engines
    await gw.stop()
    for w in workers:
        await w.stop()


def _body(seed: int | None = None) -> dict:
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 3}
    if seed is not None:
        body["seed"] = seed
    return body


@pytest.mark.asyncio
async def test_request_failure_is_not_retried_elsewhere(env) -> None:
    client, engines = env
    r = await client.post("/v1/completions", json=_body(FAILS))
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "request_failed" and "boom" in err["message"]
    assert sum(e.seen.count(FAILS) for e in engines) == 1  # one worker, no retry
    r = await client.post("/v1/completions", json=_body())
    assert r.status_code == 200, r.text


@pytest.mark.asyncio
async def test_request_that_workers_die_of_is_stopped_and_its_retries_refused(env, capsys) -> None:
    client, engines = env
    r = await client.post("/v1/completions", json=_body(DIES))
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "poison_request"
    # Not resent by the SDKs at once; identical requests are served again in 600 s.
    assert r.headers["x-should-retry"] == "false" and r.headers["retry-after"] == "600"
    # The first death was retried (it might not have been this request's fault), the
    # second was not sent to a third worker.
    assert sum(e.seen.count(DIES) for e in engines) == 2
    for _ in range(100):  # the router took both "dead" workers out of routing for a while
        r = await client.post("/v1/completions", json=_body(7))
        if r.status_code == 200:
            break
        await asyncio.sleep(0.1)
    assert r.status_code == 200, r.text
    r = await client.post("/v1/completions", json=_body(DIES))
    assert r.status_code == 500 and r.json()["error"]["code"] == "poison_request"
    assert sum(e.seen.count(DIES) for e in engines) == 2  # refused before any worker
    assert 0 < int(r.headers["retry-after"]) <= 600
    # The error names the request's fingerprint; an operator serves it again.
    found = re.search(r"epdserve poison clear ([0-9a-f]{32})", r.json()["error"]["message"])
    assert found, r.text
    common = ["--router", str(client.base_url).rstrip("/"), "--admin-token", TOKEN, "--json"]
    assert await asyncio.to_thread(admin.main, ["poison", "list", *common]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert list(listed["refused"]) == [found[1]], listed
    assert await asyncio.to_thread(admin.main, ["poison", "clear", found[1], *common]) == 0
    assert json.loads(capsys.readouterr().out) == {"forgotten": 1}
    bad = await client.delete("/admin/poison/x", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 400, bad.text
    r = await client.post("/v1/completions", json=_body(DIES))
    assert r.status_code == 500, r.text
    assert sum(e.seen.count(DIES) for e in engines) > 2  # sent to a worker again


@pytest.mark.asyncio
@pytest.mark.parametrize("env", [3], indirect=True)
async def test_a_stream_whose_workers_die_after_its_first_token_is_stopped_too(env) -> None:
    """Deaths during a stream count as well: its later steps run in other tasks than the
    first (the gateway waits for the first step in a task of its own, Starlette streams the
    body from another), and the poison counter followed only the first task's context, so
    the stream was migrated to every worker there was."""
    client, engines = env
    async with client.stream(
        "POST", "/v1/completions", json={**_body(DIES_LATER), "max_tokens": 8, "stream": True}
    ) as r:
        body = (await r.aread()).decode()
    assert "poison_request" in body, body
    assert sum(e.seen.count(DIES_LATER) for e in engines) == 2
