"""run_leased against a real etcd: a body that loses its lease starts over under a new one,
and a stop revokes the lease it holds (its keys go at once, not one TTL later)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.aio import cancel_and_wait
from services.common.etcd_client import connect_etcd
from services.common.etcd_server import EtcdServer
from services.common.leased_loop import run_leased
from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


async def test_a_lost_body_starts_over_and_a_stop_revokes_the_lease() -> None:
    leases: list[int] = []

    async def body(c, lease_id: int) -> None:
        leases.append(lease_id)
        await c.kv.put(f"/t/{len(leases)}", "x", lease=lease_id, timeout=3)
        if len(leases) == 1:
            raise RuntimeError("lost")  # the loop logs it and starts over
        await asyncio.Event().wait()  # holds the lease until cancelled

    with EtcdServer() as etcd:
        task = asyncio.create_task(run_leased([etcd.endpoint], 30, body, "t", logging.DEBUG))
        await until(lambda: len(leases) == 2, what="a second lease")
        assert leases[0] != leases[1]
        await cancel_and_wait(task)
        c = await connect_etcd([etcd.endpoint])
        try:
            # Revoked, not left to expire in 30 s: TTL -1 and the key gone.
            assert (await c.lease.time_to_live(leases[1], timeout=3)).TTL == -1
            assert not (await c.kv.get("/t/2", timeout=3)).kvs
        finally:
            await c.close()
