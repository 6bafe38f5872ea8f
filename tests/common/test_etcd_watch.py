"""etcd_watch.follow_key against a real etcd: one key or a prefix, listed then watched, and
listed again after a failure."""

from __future__ import annotations

import asyncio

import pytest

from services.common.aio import cancel_and_wait
from services.common.etcd_client import ETCD_OP_TIMEOUT_S, connect_etcd
from services.common.etcd_server import EtcdServer
from services.common.etcd_watch import follow_key
from tests.waits import until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


class Seen:
    """What follow_key handed over: every listing, and the latest value per key."""

    def __init__(self, fail_first_listing: bool = False) -> None:
        self.listings: list[dict[str, bytes]] = []
        self.values: dict[str, bytes] = {}
        self._fail = fail_first_listing

    def listed(self, kvs) -> None:
        self.listings.append({kv.key.decode(): kv.value for kv in kvs})
        if self._fail:
            self._fail = False
            raise RuntimeError("a listener that fails once")
        self.values = dict(self.listings[-1])

    def changed(self, events) -> None:
        for ev in events:
            if ev.type == 0:
                self.values[ev.kv.key.decode()] = ev.kv.value
            else:
                self.values.pop(ev.kv.key.decode(), None)


async def put(endpoint: str, key: str, value: str | None) -> None:
    """Put ``value`` at ``key``, or delete the key (None)."""
    client = await connect_etcd([endpoint])
    try:
        assert client.kv is not None
        if value is None:
            await client.kv.delete(key, timeout=ETCD_OP_TIMEOUT_S)
        else:
            await client.kv.put(key, value, timeout=ETCD_OP_TIMEOUT_S)
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_one_key_is_not_a_prefix(etcd: EtcdServer) -> None:
    # NOTE: /roles/w1 must not follow /roles/w10 (a worker's desired role is one key).
    await put(etcd.endpoint, "/k/roles/w1", "prefill")
    seen = Seen()
    task = asyncio.create_task(
        follow_key([etcd.endpoint], "/k/roles/w1", seen.listed, seen.changed, "test watch")
    )
    try:
        await until(lambda: seen.listings)
        assert seen.listings == [{"/k/roles/w1": b"prefill"}]
        await put(etcd.endpoint, "/k/roles/w10", "decode")
        await put(etcd.endpoint, "/k/roles/w1", "decode")
        await until(lambda: seen.values.get("/k/roles/w1") == b"decode")
        await put(etcd.endpoint, "/k/roles/w1", None)
        await until(lambda: "/k/roles/w1" not in seen.values)
        assert seen.values == {} and len(seen.listings) == 1
    finally:
        await cancel_and_wait(task)


@pytest.mark.asyncio
async def test_prefix_listed_again_after_a_failure(etcd: EtcdServer) -> None:
    await put(etcd.endpoint, "/p/a", "1")
    seen = Seen(fail_first_listing=True)
    task = asyncio.create_task(
        follow_key([etcd.endpoint], "/p/", seen.listed, seen.changed, "test watch", prefix=True)
    )
    try:
        # The first listing's listener failed: the loop lists again after its backoff, and a
        # key put in between is in the second listing.
        await until(lambda: seen.listings)
        await put(etcd.endpoint, "/p/b", "2")
        await until(lambda: len(seen.listings) == 2, timeout=10)
        assert seen.values.items() >= {"/p/a": b"1"}.items()
        await put(etcd.endpoint, "/p/c", "3")
        await until(lambda: seen.values == {"/p/a": b"1", "/p/b": b"2", "/p/c": b"3"})
    finally:
        await cancel_and_wait(task)
