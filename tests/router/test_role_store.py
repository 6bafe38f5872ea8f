"""The router's etcd store of desired roles and of the cluster's policy keeps one client,
drops it when a call fails, and connects again once etcd is back (a real etcd server)."""

from __future__ import annotations

import asyncio

import pytest

from services.common.etcd_server import EtcdServer
from services.router.rebalance.role_store import RoleStore, RoleStoreError

pytestmark = pytest.mark.asyncio


async def test_one_client_reused_and_replaced_after_etcd_restarts() -> None:
    with EtcdServer() as etcd:
        store = RoleStore([etcd.endpoint], "rs")
        try:
            await store.set("w1", "decode")
            client = store._session._client
            assert client is not None
            await store.set_policy('{"name": "queue"}')
            assert await store.all() == {"w1": "decode"}
            assert await store.get_policy() == '{"name": "queue"}'
            assert store._session._client is client  # four calls, one client

            etcd.stop(kill=True)
            with pytest.raises(RoleStoreError, match="etcd unavailable"):
                await store.all()
            assert store._session._client is None  # the broken client was dropped

            etcd.start()
            # Healthy (a serializable check) may come before the restarted member is its
            # own leader again: a read can still fail for a moment, and then drops its client.
            for _ in range(100):
                try:
                    roles = await store.all()
                    break
                except RoleStoreError:
                    assert store._session._client is None
                    await asyncio.sleep(0.1)
            assert roles == {"w1": "decode"}  # data kept over the restart
            assert store._session._client is not None and store._session._client is not client
        finally:
            await store.close()
        assert store._session._client is None
