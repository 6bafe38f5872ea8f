"""A worker that is starting (its etcd key says "starting", no address yet) is known to the
router: no handle, listed under "starting", counted as coming; a request for a model whose
only worker is starting waits for it (bounded) instead of a 404 or 503."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time

import pytest
from fake_handles import fake_handle
from router_fakes import FakeTokenizer

from services.common import process_id
from services.common.membership import InstanceInfo
from services.router.config import RouterConfig
from services.router.errors import APIError
from services.router.gateway import Gateway
from services.router.routing.starting import RESTART_RETRY_AFTER_S
from services.router.routing.workers import WorkerPool


def starting(iid: str = "w1", role: str = "mixed", incarnation: str = "s1") -> InstanceInfo:
    return InstanceInfo(id=iid, address="", role=role, role_epoch=0, model="m",
                        incarnation=incarnation, pid=7, host="h", state="starting")  # fmt: skip


def test_the_pool_keeps_a_starting_worker_apart_until_it_serves() -> None:
    async def main() -> None:
        pool = WorkerPool()
        pool.on_membership({"w1": starting()})
        assert pool.handles == {}  # no address: no channel, no load stream
        assert [r["id"] for r in pool.starting.rows()] == ["w1"]
        assert pool.starting.coming("mixed", "m", 60.0)
        assert not pool.starting.coming("decode", "m", 60.0)
        assert not pool.starting.coming("mixed", "m", 0.0)  # past the start budget
        assert pool.starting.models(60.0) == {"m": 0}
        assert 59 <= (pool.starting.wait_left("m", 60.0) or 0) <= 60

        serving = dataclasses.replace(starting(), address="127.0.0.1:1", state="serving",
                                      capacity={"max_model_len": 64})  # fmt: skip
        pool.on_membership({"w1": serving})
        assert list(pool.handles) == ["w1"] and pool.starting.rows() == []
        await pool.close()

        pool.on_membership({"w2": starting("w2")})
        pool.on_membership({})  # it died while starting: its lease ran out
        assert pool.starting.rows() == [] and pool.handles == {}
        assert pool.lost.models(60.0) == {}  # it never served: its tokenizer is not known
        assert not pool.starting.coming("mixed", "m", 60.0) and not pool.starting.has("m")
        assert pool.starting.models(60.0) == {"m": 0}  # a restart is due: not a 404
        assert pool.starting.models(0.0) == {}

    asyncio.run(main())


def test_a_restarted_worker_starting_replaces_its_dead_process() -> None:
    """The key of a killed worker, put again "starting" by its new process: the old handle
    goes (lost while serving: the restart wait counts it) and the new process is starting."""

    async def main() -> None:
        pool = WorkerPool()
        old = fake_handle("w1", stub=None)
        pool.handles = {"w1": old}
        pool.on_membership({"w1": starting()})
        assert pool.handles == {} and [r["id"] for r in pool.starting.rows()] == ["w1"]
        assert pool.lost.since("mixed", "m") < 5.0
        first = pool.starting.rows()[0]["for_s"]
        pool.on_membership({"w1": starting()})  # same process put again: same start
        assert pool.starting.rows()[0]["for_s"] >= first
        await pool.close()

    asyncio.run(main())


def test_a_request_for_a_model_whose_only_worker_starts_waits_for_it() -> None:
    """Before: 404 model_not_found (the router knew nothing of the worker)."""

    async def main() -> None:
        gw = Gateway(RouterConfig(etcd="127.0.0.1:1", worker_restart_wait_s=30.0),
                     FakeTokenizer())  # fmt: skip
        gw.pool.on_membership({"w1": starting()})
        assert "m" in gw.served_models()
        with pytest.raises(APIError) as err:  # a caller that does not wait (/tokenize)
            gw.resolve_model("m", serving=False)
        assert err.value.status == 503 and err.value.headers["Retry-After"] in ("29", "30")
        waiting = asyncio.create_task(gw.resolve_awake("m"))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # neither a 404 nor a 503
        gw.pool.handles = {"w1": fake_handle("w1", stub=None)}  # it registered, serving
        gw.pool.starting.update({})
        assert await asyncio.wait_for(waiting, 5.0) == ("m", 4096)
        with pytest.raises(APIError) as err:
            await gw.resolve_awake("other")
        assert err.value.status == 404

    asyncio.run(main())


@pytest.mark.parametrize("timeout_s", [0.3, 30.0])
def test_the_wait_for_a_starting_worker_is_bounded(timeout_s: float) -> None:
    """By the request's deadline (then 503 no_workers with what is left of the start budget
    as Retry-After) and by the start budget (a worker starting longer is not waited for)."""

    async def main() -> None:
        cfg = RouterConfig(etcd="127.0.0.1:1", worker_restart_wait_s=20.0,
                           request_timeout_s=timeout_s)  # fmt: skip
        gw = Gateway(cfg, FakeTokenizer())
        gw.pool.on_membership({"w1": starting()})
        if timeout_s > 20.0:  # the worker has been starting past the budget
            gw.pool.starting._seen["w1"].since -= 21.0
        start = time.monotonic()
        with pytest.raises(APIError) as err:
            await gw.resolve_awake("m")
        assert time.monotonic() - start < 5.0
        assert err.value.status == 503 and err.value.code == "no_workers"
        if timeout_s < 20.0:
            assert 18 <= int(err.value.headers["Retry-After"]) <= 20

    asyncio.run(main())


def test_a_worker_that_dies_starting_ends_the_wait_with_a_503() -> None:
    """Killed while starting (its lease ran out, or its process is seen gone): a request
    waiting for it was kept waiting, then got a 404 model_not_found once the key expired. Now
    its death ends the wait: 503 no_workers with a Retry-After while its restart is due (new
    requests too, at once), and its restarted process starting is waited for again."""

    async def main() -> None:
        gw = Gateway(RouterConfig(etcd="127.0.0.1:1", worker_restart_wait_s=30.0),
                     FakeTokenizer())  # fmt: skip
        gw.pool.on_membership({"w1": starting()})
        waiting = asyncio.create_task(gw.resolve_awake("m"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        gw.pool.on_membership({})  # its key is gone
        for request in (waiting, gw.resolve_awake("m")):
            with pytest.raises(APIError) as err:
                await asyncio.wait_for(request, 2.0)
            assert (err.value.status, err.value.code) == (503, "no_workers")
            assert 1 <= int(err.value.headers["Retry-After"]) <= RESTART_RETRY_AFTER_S
        # A caller that does not wait (/tokenize): its tokenizer is still not known (it was
        # (m, 0), tokenized with the router's default tokenizer).
        with pytest.raises(APIError) as err:
            gw.resolve_model("m", serving=False)
        assert (err.value.status, err.value.code) == (503, "no_workers")
        assert 1 <= int(err.value.headers["Retry-After"]) <= RESTART_RETRY_AFTER_S
        gw.pool.starting._seen["w1"].died -= 31.0  # the restart window is over: forgotten
        with pytest.raises(APIError) as err:
            await gw.resolve_awake("m")
        assert err.value.status == 503 and err.value.code == "no_workers"  # no model left

        gw.pool.on_membership({"w1": starting(incarnation="s2")})  # restarted: starting
        waiting = asyncio.create_task(gw.resolve_awake("m"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        gw.pool.handles = {"w1": fake_handle("w1", stub=None)}  # it registered, serving
        gw.pool.starting.update({})
        assert await asyncio.wait_for(waiting, 5.0) == ("m", 4096)

    asyncio.run(main())


def test_a_local_worker_killed_starting_is_seen_gone_before_its_lease_ends() -> None:
    """Its key names its process (``proc``): a router on the same machine sees it exit within
    a poll, not the starting lease's 15 s later."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = dataclasses.replace(starting(), pid=child.pid,
                                   proc=process_id.identity(child.pid))  # fmt: skip
        pool = WorkerPool()
        pool.on_membership({"w1": info})
        assert pool.starting.coming("mixed", "m", 60.0) and pool.starting.has("m")
        child.kill()
        child.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while pool.starting.coming("mixed", "m", 60.0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pool.starting.coming("mixed", "m", 60.0) and not pool.starting.has("m")
        assert pool.starting.models(60.0) == {"m": 0} and pool.starting.rows() == []
    finally:
        child.kill()
