"""etcd membership against a real etcd: register, watch, lease expiry, outage recovery."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.common.etcd_server import EtcdServer
from services.common.membership import InstanceInfo, MembershipWatcher, Registrar
from tests.waits import until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def etcd():
    with EtcdServer() as server:
        yield server


def _info(iid: str) -> InstanceInfo:
    return InstanceInfo(
        id=iid, address="127.0.0.1:1", role="mixed", role_epoch=1, model="m",
        incarnation="inc-" + iid, pid=os.getpid(), host="h", capacity={"max_model_len": 64},
    )  # fmt: skip


def test_instance_info_json_round_trip() -> None:
    info = _info("a")
    assert InstanceInfo.from_json(info.to_json()) == info
    # unknown fields from newer writers are ignored
    assert InstanceInfo.from_json(info.to_json()[:-1] + ', "extra": 1}') == info


@pytest.mark.asyncio
async def test_register_watch_update_deregister(etcd: EtcdServer) -> None:
    watcher = MembershipWatcher([etcd.endpoint], "t1")
    await watcher.start()
    reg = Registrar([etcd.endpoint], "t1", _info("w1"), ttl=2)
    await reg.start()
    try:
        await until(lambda: "w1" in watcher.instances)
        assert watcher.instances["w1"].role == "mixed"
        reg.update(role="decode", role_epoch=2)
        await until(lambda: watcher.instances["w1"].role_epoch == 2)
        await reg.stop(deregister=True)
        await until(lambda: "w1" not in watcher.instances)
    finally:
        await reg.stop()
        await watcher.stop()


@pytest.mark.asyncio
async def test_lease_expiry_removes_dead_worker(etcd: EtcdServer) -> None:
    watcher = MembershipWatcher([etcd.endpoint], "t2")
    await watcher.start()
    reg = Registrar([etcd.endpoint], "t2", _info("w1"), ttl=2)
    await reg.start()
    try:
        await until(lambda: "w1" in watcher.instances)
        await reg.stop(deregister=False)  # like kill -9: the keep-alive just stops
        await until(lambda: "w1" not in watcher.instances, timeout=10)
    finally:
        await watcher.stop()


@pytest.mark.asyncio
async def test_etcd_restart_keeps_view_and_reregisters(etcd: EtcdServer) -> None:
    watcher = MembershipWatcher([etcd.endpoint], "t3")
    await watcher.start()
    reg = Registrar([etcd.endpoint], "t3", _info("w1"), ttl=2)
    await reg.start()
    try:
        await until(lambda: "w1" in watcher.instances)
        await asyncio.to_thread(etcd.stop, True)
        await asyncio.sleep(3.0)  # longer than the TTL: the registrar gives the lease up
        assert "w1" in watcher.instances  # the last view stays while etcd is away
        await asyncio.to_thread(etcd.start)
        await until(lambda: reg.registered.is_set(), timeout=20)
        # A new worker registered after the outage is seen through the resumed watch.
        reg2 = Registrar([etcd.endpoint], "t3", _info("w2"), ttl=2)
        await reg2.start()
        await until(lambda: "w2" in watcher.instances and "w1" in watcher.instances, timeout=20)
        await reg2.stop()
    finally:
        await reg.stop()
        await watcher.stop()
