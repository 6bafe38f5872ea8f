"""The waiting board against a real etcd: each router publishes the requests waiting at it
per model under its lease; the reading router (the leader) sums every router's."""

from __future__ import annotations

import pytest

from services.common.etcd_server import EtcdServer
from services.router.waiting_board import WaitingBoard, parse_counts
from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


async def test_the_leader_reads_every_routers_waiting_requests() -> None:
    with EtcdServer() as etcd:
        other = WaitingBoard([etcd.endpoint], "t", "router-a", read=lambda: False, ttl=2,
                             tick_s=0.05)  # fmt: skip
        leader = WaitingBoard([etcd.endpoint], "t", "router-b", read=lambda: True, ttl=2,
                              tick_s=0.05)  # fmt: skip
        await other.start()
        await leader.start()
        try:
            with other.waiting("m1"), other.waiting("m1"), other.waiting("m2"):
                await until(lambda: leader.cluster_waiting() == {"m1": 2, "m2": 1})
                with leader.waiting("m2"):  # its own count is read from memory
                    assert leader.cluster_waiting() == {"m1": 2, "m2": 2}
                assert leader.cluster_waiting() == {"m1": 2, "m2": 1}
                assert other.cluster_waiting() == {"m1": 2, "m2": 1}  # its own only
            await until(lambda: leader.cluster_waiting() == {})
            # A router that stops with requests counted takes them away (its lease revoked).
            with other.waiting("m1"):
                await until(lambda: leader.cluster_waiting() == {"m1": 1})
                await other.stop()
                await until(lambda: leader.cluster_waiting() == {})
        finally:
            await other.stop()
            await leader.stop()


async def test_unreadable_counts_are_ignored() -> None:
    assert parse_counts(b'{"m": 2, "n": 0}') == {"m": 2}
    for junk in (b"", b"[1]", b'{"m": "x"}', b"\xff"):
        assert parse_counts(junk) == {}
