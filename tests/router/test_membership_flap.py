"""A worker whose etcd key expires while it still answers (etcd down or stalled longer than
the lease) keeps serving until it registers again; one that stopped answering is dropped."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.common.membership import InstanceInfo
from services.common.proto import worker_pb2 as pb
from services.router.routing import workers
from services.router.routing.workers import WorkerHandle, WorkerPool


def info(iid: str, incarnation: str = "i1") -> InstanceInfo:
    return InstanceInfo(
        id=iid, address="127.0.0.1:9", role="mixed", role_epoch=1, model="m",
        incarnation=incarnation, pid=1, host="h",
    )  # fmt: skip


@pytest.fixture(autouse=True)
def no_load_streams(monkeypatch):
    """Handles start no load stream here: each test says when a report arrived."""
    monkeypatch.setattr(WorkerHandle, "start", lambda self: None)


def reported(h: WorkerHandle) -> None:
    h.load, h.load_at = pb.LoadReport(), time.monotonic()


def test_worker_that_still_answers_survives_its_key_expiring() -> None:
    async def main() -> None:
        pool = WorkerPool()
        pool.on_membership({"w1": info("w1")})
        h = pool.handles["w1"]
        reported(h)
        pool.on_membership({})  # its lease expired during an etcd outage
        assert pool.candidates() == [h]  # still routed to, no gap
        pool.on_membership({"w1": info("w1")})  # it registered again
        assert pool.handles["w1"] is h and h.departed_at == 0.0
        assert pool.candidates() == [h]
        await pool.close()

    asyncio.run(main())


def test_departed_worker_is_dropped_when_it_stops_answering_or_stays_away() -> None:
    async def main() -> None:
        pool = WorkerPool()
        pool.on_membership({"w1": info("w1"), "w2": info("w2")})
        w1, w2 = pool.handles["w1"], pool.handles["w2"]
        reported(w1)
        reported(w2)
        pool.on_membership({})
        assert set(pool.handles) == {"w1", "w2"}
        w1.mark_failed()  # its load stream broke: the load loop tells the pool
        w1.on_gone(w1)
        assert "w1" not in pool.handles
        w2.departed_at -= workers.DEPARTED_GRACE_S + 1  # away too long
        assert pool.candidates() == []
        w2.on_gone(w2)  # at its next load report
        assert "w2" not in pool.handles
        await pool.close()

    asyncio.run(main())


def test_dead_or_restarted_worker_is_dropped_at_once() -> None:
    async def main() -> None:
        pool = WorkerPool()
        pool.on_membership({"w1": info("w1"), "w2": info("w2")})
        w1, w2 = pool.handles["w1"], pool.handles["w2"]
        reported(w2)
        w1.mark_failed()  # it died: its load stream broke
        pool.on_membership({"w2": info("w2", incarnation="i2")})  # w2 restarted
        assert "w1" not in pool.handles
        assert pool.handles["w2"] is not w2  # a new handle for the new process
        await pool.close()

    asyncio.run(main())
