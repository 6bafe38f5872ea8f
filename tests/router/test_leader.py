"""The rebalancer election among router replicas, against a real etcd."""

from __future__ import annotations

import asyncio

import pytest

from services.common.etcd_server import EtcdServer
from services.router.rebalance.leader import LeaderElection

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


async def _until(pred, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_one_leader_and_a_handover() -> None:
    with EtcdServer() as etcd:
        a = LeaderElection([etcd.endpoint], "t", "router-a", ttl=2)
        b = LeaderElection([etcd.endpoint], "t", "router-b", ttl=2)
        await a.start()
        await _until(lambda: a.is_leader)
        await b.start()
        await _until(lambda: b.leader == "router-a")
        assert not b.is_leader
        await a.stop()  # a leader that stops revokes its lease: b takes over at once
        await _until(lambda: b.is_leader, timeout=10)
        assert not a.is_leader
        await b.stop()
