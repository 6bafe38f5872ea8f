"""The rebalancer election among router replicas, against a real etcd."""

from __future__ import annotations

import pytest

from services.common.etcd_server import EtcdServer
from services.router.rebalance.leader import LeaderElection
from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


async def test_one_leader_and_a_handover() -> None:
    with EtcdServer() as etcd:
        a = LeaderElection([etcd.endpoint], "t", "router-a", ttl=2)
        b = LeaderElection([etcd.endpoint], "t", "router-b", ttl=2)
        await a.start()
        await until(lambda: a.is_leader)
        await b.start()
        await until(lambda: b.leader == "router-a")
        assert not b.is_leader
        await a.stop()  # a leader that stops revokes its lease: b takes over at once
        await until(lambda: b.is_leader, timeout=10)
        assert not a.is_leader
        await b.stop()
