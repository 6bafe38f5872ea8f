"""Desired roles in etcd (``/epdserve/<cluster>/roles/<id>``): written by the rebalancer and
the admin API, followed by the workers; and the cluster's rebalancing policy
(``/epdserve/<cluster>/rebalance/policy``), followed by every router. One client is kept and
reused; a call that fails drops it (the next call connects again), and every call is bounded
by a timeout: a router must keep serving while etcd is away (the write then fails, clearly)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from etcd3aio import Etcd3Client, prefix_range_end

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, EtcdSession
from services.common.membership import rebalance_policy_key, role_key, roles_prefix


class RoleStoreError(RuntimeError):
    """etcd could not be reached (or answered an error) while reading or writing roles."""


class RoleStore:
    def __init__(self, endpoints: list[str], cluster: str) -> None:
        self.endpoints = endpoints
        self.cluster = cluster
        self._session = EtcdSession(endpoints)

    async def set(self, instance_id: str, role: str) -> None:
        async def put(c: Etcd3Client) -> None:
            assert c.kv is not None
            await c.kv.put(role_key(self.cluster, instance_id), role, timeout=ETCD_OP_TIMEOUT_S)

        await self._with_client(put)

    async def set_policy(self, document: str) -> None:
        """Store the cluster's rebalancing policy (a JSON document)."""

        async def put(c: Etcd3Client) -> None:
            assert c.kv is not None
            await c.kv.put(rebalance_policy_key(self.cluster), document, timeout=ETCD_OP_TIMEOUT_S)

        await self._with_client(put)

    async def get_policy(self) -> str | None:
        """The stored policy document, or None when none was ever set."""
        found: list[str] = []

        async def get(c: Etcd3Client) -> None:
            assert c.kv is not None
            resp = await c.kv.get(rebalance_policy_key(self.cluster), timeout=ETCD_OP_TIMEOUT_S)
            found.extend(kv.value.decode() for kv in resp.kvs)

        await self._with_client(get)
        return found[0] if found else None

    async def all(self) -> dict[str, str]:
        """Worker id -> desired role, for every worker that has one."""
        prefix = roles_prefix(self.cluster)
        out: dict[str, str] = {}

        async def get(c: Etcd3Client) -> None:
            assert c.kv is not None
            resp = await c.kv.get(
                prefix, range_end=prefix_range_end(prefix.encode()), timeout=ETCD_OP_TIMEOUT_S
            )
            for kv in resp.kvs:
                out[kv.key.decode()[len(prefix) :]] = kv.value.decode()

        await self._with_client(get)
        return out

    async def close(self) -> None:
        await self._session.close()

    async def _with_client(self, fn: Callable[[Etcd3Client], Awaitable[None]]) -> None:
        try:
            await self._session.call(fn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise RoleStoreError(f"etcd unavailable: {exc}") from exc
