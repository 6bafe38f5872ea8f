"""A worker's etcd lease is refreshed from a thread of its own (services/common/lease_keeper.py):
an event loop blocked for longer than the TTL keeps its key in etcd, and one stuck past the
keeper's bound lets it lapse and registers again once it runs. Real etcd."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, connect_etcd
from services.common.etcd_server import EtcdServer
from services.common.lease_keeper import LeaseKeeper
from services.common.membership import InstanceInfo, Registrar, instance_key
from tests.waits import until

pytestmark = pytest.mark.timeout(120)
TTL = 2


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


def info(iid: str) -> InstanceInfo:
    return InstanceInfo(iid, "127.0.0.1:1", "mixed", 1, "m", "inc", os.getpid(), "h")


class KeyLog:
    """Reads one key from etcd every 0.1 s in a thread (with a loop and client of its own,
    so the blocked loop under test cannot hold it up): the times it was absent."""

    def __init__(self, endpoint: str, key: str) -> None:
        self.endpoint, self.key = endpoint, key
        self.reads = 0
        self.missing = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        client = await connect_etcd([self.endpoint])
        try:
            while not self._stop.is_set():
                resp = await client.kv.get(self.key, timeout=ETCD_OP_TIMEOUT_S)  # type: ignore[union-attr]
                self.reads += 1
                self.missing += not resp.kvs
                await asyncio.sleep(0.1)
        finally:
            await client.close()

    def __enter__(self) -> KeyLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def registered(reg: Registrar) -> None:
    await asyncio.wait_for(reg.registered.wait(), 15)


def test_a_loop_blocked_longer_than_the_ttl_keeps_its_key(etcd: EtcdServer) -> None:
    async def scenario() -> None:
        reg = Registrar([etcd.endpoint], "lk1", info("w1"), ttl=TTL)
        await reg.start()
        try:
            await registered(reg)
            with KeyLog(etcd.endpoint, instance_key("lk1", "w1")) as keys:
                await asyncio.sleep(0.5)
                time.sleep(3 * TTL)  # NOTE: blocks the loop, as a long synchronous call does
                await asyncio.sleep(TTL)  # the old code noticed its lapsed lease here
            assert keys.reads > 3 * TTL * 5  # the reader ran throughout
            assert keys.missing == 0
            assert reg.registrations == 1  # never lost, so never registered again
        finally:
            await reg.stop()

    asyncio.run(scenario())


def test_a_loop_stuck_past_the_bound_lets_the_lease_lapse(etcd: EtcdServer) -> None:
    async def scenario() -> None:
        reg = Registrar([etcd.endpoint], "lk2", info("w2"), ttl=TTL, stall_limit_s=1.0)
        await reg.start()
        try:
            await registered(reg)
            with KeyLog(etcd.endpoint, instance_key("lk2", "w2")) as keys:
                time.sleep(3 * TTL + 1)  # past the 1 s bound, and the TTL after it
                missing = keys.missing
            assert missing > 0  # a process whose loop is stuck leaves membership
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while reg.registrations < 2:  # running again: it registers again
                assert loop.time() < deadline, "never registered again"
                await asyncio.sleep(0.1)
        finally:
            await reg.stop()

    asyncio.run(scenario())


def test_stop_ends_the_refreshes(etcd: EtcdServer) -> None:
    async def scenario() -> None:
        reg = Registrar([etcd.endpoint], "lk3", info("w3"), ttl=TTL)
        await reg.start()
        await registered(reg)
        await reg.stop(deregister=False)  # like kill -9 of the loop's owner: no revoke

        def keeper_gone() -> bool:
            return all(t.name != "etcd-lease-keeper" for t in threading.enumerate())

        with KeyLog(etcd.endpoint, instance_key("lk3", "w3")) as keys:
            # Nobody refreshes the lease any more: the key goes within a TTL of the last
            # refresh, and the keeper's thread ends within one etcd call.
            await until(lambda: keys.missing > 0 and keeper_gone(), 2 * TTL + ETCD_OP_TIMEOUT_S,
                        "the key gone and the keeper ended")  # fmt: skip

    asyncio.run(scenario())


def test_a_call_holding_the_gil_past_the_ttl_leaves_and_comes_back_at_once(
    etcd: EtcdServer,
) -> None:
    """NOTE: what is right here: a C call that holds the GIL (no thread of the process runs,
    so neither the keeper nor the gRPC servers can answer) for longer than the TTL makes the
    process as unresponsive as a SIGSTOP: its lease lapses and the router migrates its
    requests. Once the call returns, the keeper finds the lease gone and the Registrar
    registers again within a moment, without waiting for the stall bound."""
    import ctypes

    async def scenario() -> None:
        reg = Registrar([etcd.endpoint], "lk4", info("w4"), ttl=TTL)
        await reg.start()
        try:
            await registered(reg)
            ctypes.PyDLL(None).usleep(3 * TTL * 1_000_000)  # PyDLL: the GIL stays held
            released = time.monotonic()
            while reg.registrations < 2:
                assert time.monotonic() - released < 3 * TTL, "never registered again"
                await asyncio.sleep(0.05)
            client = await connect_etcd([etcd.endpoint])
            try:
                resp = await client.kv.get(instance_key("lk4", "w4"), timeout=ETCD_OP_TIMEOUT_S)  # type: ignore[union-attr]
            finally:
                await client.close()
            assert resp.kvs, "registered again, but the key is not in etcd"
        finally:
            await reg.stop()

    asyncio.run(scenario())


def _switches(tid: int) -> int:
    """Times thread ``tid`` of this process went to sleep (voluntary context switches)."""
    with open(f"/proc/self/task/{tid}/status") as f:
        line = next(x for x in f if x.startswith("voluntary_ctxt_switches:"))
    return int(line.split()[1])


def test_the_keeper_sleeps_through_the_owner_loops_grpc_calls(etcd: EtcdServer) -> None:
    """grpc.aio (1.85) wakes every event loop of the process that has made a channel on each
    completion of any of them (one shared wake-up socket). A keeper whose loop idled between
    refreshes was woken by every message of the worker's own RPCs (1-2.4 times a request in
    the gateway benchmark, RESULTS.md): its loop now runs only while it refreshes."""
    calls = 1000

    async def scenario() -> None:
        client = await connect_etcd([etcd.endpoint])
        assert client.lease is not None and client.kv is not None
        lease = await client.lease.grant(TTL, timeout=ETCD_OP_TIMEOUT_S)
        keeper = LeaseKeeper([etcd.endpoint], lease.ID, TTL, time.monotonic, lambda *a: None)
        keeper.start()
        try:
            await until(lambda: keeper.refreshes >= 1, 5 * TTL, "the keeper's first refresh")
            tid = keeper._thread.native_id
            assert tid is not None
            before = _switches(tid)
            for _ in range(calls):  # the owner's loop: gRPC calls of its own
                await client.kv.get("lk5", timeout=ETCD_OP_TIMEOUT_S)
            woken = _switches(tid) - before
        finally:
            keeper.stop()
            await client.close()
        # NOTE: a refresh every TTL/3 s still wakes it a few times; the old keeper was woken
        # about once a call (>= 1,000 here).
        assert woken < calls // 5, f"the keeper's thread woke {woken} times in {calls} calls"

    asyncio.run(scenario())
