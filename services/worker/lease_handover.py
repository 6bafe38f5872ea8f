"""A worker's etcd key across a model load's in-place restart (``os.execv``).

Deregistering before the restart left routers nothing to watch: a new image that died while
loading (killed, out of memory, a crash in native code) was noticed only when the admin call's
600 s ran out. Instead the old image leaves its key in etcd, advertising "loading", on a lease
of HANDOVER_TTL_S seconds (``Registrar.hand_over``) and names that lease in the environment;
the new image keeps it alive from its first lines (``__main__``, before the heavy imports)
until its own registration has replaced the key. If the process dies, the key is gone within
the TTL and the admin call ends at once (router/api/admin_models.py). An image that falls back
to the old model (model_load.fall_back) inherits the environment and keeps the lease the same
way.

etcd away longer than the TTL ends the lease by itself while the process lives: the keeper
then puts the handed-over key back on a new lease (only where the key is gone: the process's
own registration is never overwritten), so that a router's wait can still tell a live process
from a dead one once etcd answers again. An image that falls back with the first lease's id
in its environment finds the key put back and keeps the lease it is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time

from etcd3aio import Etcd3Client

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, connect_etcd
from services.common.lease_keeper import keep_alive_once

log = logging.getLogger(__name__)

# {"lease": id, "ttl": seconds, "endpoints": [...]}: set between the restart and serving.
ENV = "EPDSERVE_WORKER_HANDOVER"
# Bridges the gap between the old image's hand-over and the new image's first keep-alive
# (interpreter start-up and the etcd client's import: ~1 s, several on a loaded machine); a
# new image that died is noticed within it.
HANDOVER_TTL_S = 15


def handover_env(lease: int, endpoints: list[str], key: str, value: str) -> str:
    """The value of ENV that hands ``lease``, holding ``key`` = ``value``, over to the next
    image."""
    return json.dumps({"lease": lease, "ttl": HANDOVER_TTL_S, "endpoints": endpoints,
                       "key": key, "value": value})  # fmt: skip


class LeaseKeeper:
    """Keeps a handed-over lease alive from a thread of its own (the event loop does not run
    yet, and the engine's start blocks a while) until ``release``; with ``value``, puts
    ``key`` back on a new lease where the lease ran out (etcd was away) and the key is gone."""

    def __init__(
        self, lease: int, ttl: float, endpoints: list[str], key: str = "", value: str = ""
    ) -> None:
        self.lease = lease
        self.ttl = ttl
        self.endpoints = endpoints
        self.key = key
        self.value = value  # "": nothing to put back (the key ends with the lease)
        self._stop = threading.Event()
        self._revoke = False
        self._thread = threading.Thread(target=self._run, name="lease-handover", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def release(self, revoke: bool) -> None:
        """Stop keeping the lease alive; ``revoke``: the new registration replaced the key,
        so end the lease now (else it runs out by itself)."""
        self._revoke = revoke
        self._stop.set()
        self._thread.join(timeout=ETCD_OP_TIMEOUT_S + 1)

    def _run(self) -> None:
        try:
            asyncio.run(self._keep())
        except Exception as exc:  # the key runs out: routers see the worker gone
            log.warning("could not keep the handed-over lease %x alive: %s", self.lease, exc)

    async def _keep(self) -> None:
        client: Etcd3Client | None = None
        last_ok = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    client = client or await connect_etcd(self.endpoints)
                    ttl = await asyncio.wait_for(keep_alive_once(client, self.lease),
                                                 timeout=ETCD_OP_TIMEOUT_S)  # fmt: skip
                    if ttl <= 0 and self.value:
                        ttl = await asyncio.wait_for(self._put_back(client),
                                                     timeout=ETCD_OP_TIMEOUT_S)  # fmt: skip
                except Exception as exc:  # try again on a fresh client while it may live
                    if time.monotonic() - last_ok > self.ttl and not self.value:
                        raise
                    log.info("keeping the handed-over lease alive failed (%s); retrying", exc)
                    await _closed(client)
                    client = None
                    await asyncio.to_thread(self._stop.wait, 0.5)
                    continue
                if ttl <= 0:
                    log.warning("the handed-over lease %x had run out", self.lease)
                    return
                last_ok = time.monotonic()
                await asyncio.to_thread(self._stop.wait, self.ttl / 3)
            if self._revoke:
                client = client or await connect_etcd(self.endpoints)
                assert client.lease is not None
                await client.lease.revoke(self.lease, timeout=ETCD_OP_TIMEOUT_S)
        finally:
            await _closed(client)

    async def _put_back(self, client: Etcd3Client) -> int:
        """The lease ran out: keep the key on another lease; returns its TTL, 0 where the
        key is someone else's now (this process's registration replaced it)."""
        assert client.kv is not None and client.lease is not None
        got = await client.kv.get(self.key, timeout=ETCD_OP_TIMEOUT_S)
        if got.kvs and got.kvs[0].value == self.value.encode():  # put back by an earlier image
            self.lease = int(got.kvs[0].lease)
            log.info("keeping %s on lease %x, where it was put back", self.key, self.lease)
            return int(self.ttl)
        if got.kvs:
            log.info("the handed-over lease %x ran out; %s is registered", self.lease, self.key)
            return 0
        grant = await client.lease.grant(int(self.ttl), timeout=ETCD_OP_TIMEOUT_S)
        put = client.kv.txn_op_put(self.key, self.value, lease=grant.ID)
        absent = client.kv.txn_compare_create_revision(self.key, 0)
        resp = await client.kv.txn(compare=[absent], success=[put], timeout=ETCD_OP_TIMEOUT_S)
        if not resp.succeeded:  # registered meanwhile: looked at again next round
            await client.lease.revoke(grant.ID, timeout=ETCD_OP_TIMEOUT_S)
            raise RuntimeError(f"{self.key} was put meanwhile")
        log.warning("the handed-over lease %x ran out (etcd away); %s put back on lease %x",
                    self.lease, self.key, grant.ID)  # fmt: skip
        self.lease = int(grant.ID)
        return int(self.ttl)


async def _closed(client: Etcd3Client | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            await client.close()


def keep_from_env() -> LeaseKeeper | None:
    """Start keeping the lease the previous image handed over, if it did."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        spec = json.loads(raw)
        keeper = LeaseKeeper(int(spec["lease"]), float(spec["ttl"]), list(spec["endpoints"]),
                             str(spec.get("key", "")), str(spec.get("value", "")))  # fmt: skip
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring a malformed %s: %s", ENV, exc)
        return None
    return keeper.start()
