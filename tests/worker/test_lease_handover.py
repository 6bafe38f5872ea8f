"""A model load's handed-over key (services/worker/lease_handover.py) across an etcd outage
longer than its lease: the restarting process puts the key back once etcd answers again, so
that a router's load wait (router/api/admin_models.py) can tell it from a process that died.
Real etcd, stopped with SIGSTOP and continued."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, connect_etcd
from services.common.etcd_server import EtcdServer
from services.worker import lease_handover

pytestmark = pytest.mark.timeout(120)

TTL = 2
KEY = "/epdserve/lh/instances/w1"
VALUE = '{"id": "w1", "state": "loading"}'


async def value_and_lease(endpoint: str) -> tuple[str | None, int]:
    client = await connect_etcd([endpoint])
    try:
        resp = await client.kv.get(KEY, timeout=ETCD_OP_TIMEOUT_S)  # type: ignore[union-attr]
        return (resp.kvs[0].value.decode(), resp.kvs[0].lease) if resp.kvs else (None, 0)
    finally:
        await client.close()


async def until(endpoint: str, pred, timeout: float) -> tuple[str | None, int]:
    deadline = time.monotonic() + timeout
    while True:
        got = await value_and_lease(endpoint)
        if pred(got):
            return got
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.1)


async def hand_over(endpoint: str) -> int:
    """The key put on a lease of TTL seconds, as Registrar.hand_over leaves it."""
    client = await connect_etcd([endpoint])
    try:
        grant = await client.lease.grant(TTL, timeout=ETCD_OP_TIMEOUT_S)  # type: ignore[union-attr]
        await client.kv.put(KEY, VALUE, lease=grant.ID, timeout=ETCD_OP_TIMEOUT_S)  # type: ignore[union-attr]
        return int(grant.ID)
    finally:
        await client.close()


def test_a_key_that_ran_out_while_etcd_was_stopped_is_put_back() -> None:
    """etcd stopped twice the TTL: the lease runs out, and the keeper used to give up (the
    key stayed gone while the process loaded on, so a router could not tell it from a dead
    one). The key is back with its value, a fallback image given the stale lease id keeps
    the lease it was put back on, and a release with revoke ends it."""

    async def main(etcd: EtcdServer) -> None:
        assert etcd.proc is not None
        lease = await hand_over(etcd.endpoint)
        os.environ[lease_handover.ENV] = lease_handover.handover_env(
            lease, [etcd.endpoint], KEY, VALUE
        )
        try:
            keeper = lease_handover.keep_from_env()
        finally:
            del os.environ[lease_handover.ENV]
        assert keeper is not None
        try:
            await asyncio.sleep(0.5)
            os.kill(etcd.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(2 * TTL + 1)
        finally:
            os.kill(etcd.proc.pid, signal.SIGCONT)
        await until(etcd.endpoint, lambda got: got[0] is None, timeout=10)  # ran out
        value, again = await until(etcd.endpoint, lambda got: got[0] is not None, timeout=15)
        assert value == VALUE and again != lease
        # The image that falls back inherits the first lease's id: it keeps the new one.
        await asyncio.to_thread(keeper.release, False)
        fallback = lease_handover.LeaseKeeper(lease, TTL, [etcd.endpoint], KEY, VALUE).start()
        await asyncio.sleep(3 * TTL)  # past the lease nobody else keeps now
        assert await value_and_lease(etcd.endpoint) == (VALUE, again)
        await asyncio.to_thread(fallback.release, True)
        assert await value_and_lease(etcd.endpoint) == (None, 0)

    with EtcdServer() as etcd:
        asyncio.run(main(etcd))


def test_a_key_the_registration_replaced_is_left_alone() -> None:
    """Its lease ran out after the process registered (the registration's key is there):
    nothing is put over it."""

    async def main(etcd: EtcdServer) -> None:
        await hand_over(etcd.endpoint)
        client = await connect_etcd([etcd.endpoint])
        try:
            registration = await client.lease.grant(60, timeout=ETCD_OP_TIMEOUT_S)  # type: ignore[union-attr]
            await client.kv.put(KEY, "registered", lease=registration.ID,  # type: ignore[union-attr]
                                timeout=ETCD_OP_TIMEOUT_S)  # fmt: skip
            stale = lease_handover.LeaseKeeper(1, TTL, [etcd.endpoint], KEY, VALUE).start()
            await asyncio.sleep(2 * TTL)
            assert await value_and_lease(etcd.endpoint) == ("registered", registration.ID)
            await asyncio.to_thread(stale.release, True)
            assert await value_and_lease(etcd.endpoint) == ("registered", registration.ID)
        finally:
            await client.close()

    with EtcdServer() as etcd:
        asyncio.run(main(etcd))
