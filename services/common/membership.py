"""Cluster membership in etcd: each worker holds a leased key; routers watch the prefix.

Key: ``/epdserve/<cluster>/instances/<id>``; value: ``InstanceInfo`` as JSON. The lease has a
short TTL and is kept alive by the worker; when the worker dies the key disappears within the
TTL. ``Registrar`` re-creates lease and key by itself after a lease loss or an etcd outage.
``MembershipWatcher`` lists the prefix, then watches from the next revision (etcd_watch.py);
etcd3aio resumes the watch by revision after an outage, and while etcd is away the last view
stays in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from etcd3aio import Etcd3Client

from services.common.aio import cancel_and_wait
from services.common.etcd_client import ETCD_OP_TIMEOUT_S, connect_etcd
from services.common.etcd_watch import follow_key
from services.common.lease_keeper import LOST, RESUMED, LeaseKeeper

log = logging.getLogger(__name__)


def instances_prefix(cluster: str) -> str:
    return f"/epdserve/{cluster}/instances/"


def instance_key(cluster: str, instance_id: str) -> str:
    return instances_prefix(cluster) + instance_id


def kvstore_prefix(cluster: str) -> str:
    """Keys of the kvstore processes (InstanceInfo values, role "kvstore"). Kept apart from
    the workers' prefix so that routing and role code never take a kvstore for a worker."""
    return f"/epdserve/{cluster}/kvstore/"


def roles_prefix(cluster: str) -> str:
    """Desired roles, written by the rebalancer and the admin API; workers converge to them."""
    return f"/epdserve/{cluster}/roles/"


def rebalance_policy_key(cluster: str) -> str:
    """The cluster's rebalancing policy, ``{"name": ..., "params": {...}}`` as JSON: written by
    ``epdserve policy set`` through any router, followed by every router."""
    return f"/epdserve/{cluster}/rebalance/policy"


def role_key(cluster: str, instance_id: str) -> str:
    """The desired-role key of one worker; its value is the role name (plain text)."""
    return roles_prefix(cluster) + instance_id


def election_name(cluster: str) -> str:
    """The etcd election among router replicas; its winner runs the rebalancer."""
    return f"epdserve-{cluster}-rebalancer"


# Advertised worker states: taking work | refusing new work (operator drain) | converging
# to a new role or going to sleep (refusing new work, finishing what it holds) | asleep (its
# weights and KV memory given back: services/engine/sleep.py) or waking up | draining for a
# restart with another model (services/worker/model_load.py) | started, its model not loaded
# yet (no address: services/worker/starting.py, router/routing/starting.py).
WORKER_STATES = ("serving", "draining", "flipping", "sleeping", "loading", "starting")


@dataclass
class InstanceInfo:
    """What a worker advertises about itself (the etcd value, JSON)."""

    id: str  # stable instance name, unique in the cluster
    address: str  # host:port of its gRPC server
    role: str  # "mixed" | "prefill" | "decode"
    role_epoch: int  # bumped on every role change; stale-epoch requests are refused
    model: str  # served model name
    incarnation: str  # new random id per process start: tells restarts apart
    pid: int
    host: str
    capacity: dict[str, Any] = field(default_factory=dict)  # max_model_len, max_num_seqs, ...
    draining: bool = False
    state: str = "serving"  # one of WORKER_STATES; routers use only "serving" workers
    # process_id.identity() of a starting worker: a router on its machine sees it exit
    # before its key's lease runs out (routing/starting.py); "" when not known.
    proc: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, data: bytes | str) -> InstanceInfo:
        raw = json.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


class Registrar:
    """Keeps one worker's key alive in etcd, re-registering after lease loss or outage."""

    def __init__(
        self,
        endpoints: list[str],
        cluster: str,
        info: InstanceInfo,
        ttl: int = 5,
        prefix: str | None = None,  # default: the workers' instances prefix
        stall_limit_s: float | None = None,  # see LeaseKeeper; None: default_stall_limit
    ):
        if ttl < 2:
            raise ValueError("lease ttl must be >= 2 seconds")
        self.endpoints = endpoints
        self.key = (prefix or instances_prefix(cluster)) + info.id
        self.info = info
        self.ttl = ttl
        self.registered = asyncio.Event()  # set while our key is believed to be in etcd
        self.registrations = 0  # how many times the key was (re)created: tests read it
        self._lease_id = 0
        self._client: Etcd3Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()  # info changed: put again
        # (lease, kind, detail): the lease keeper's news (LOST, RESUMED), or (0, "", "")
        # from update() so that a change is put at once.
        self._news: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        self.stall_limit_s = stall_limit_s
        self._tick = 0.0  # when this loop last ran the registration (the keeper reads it)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="etcd-registrar")

    def update(self, **changes: Any) -> None:
        """Change advertised fields (role, epoch, draining); the new value is put shortly."""
        self.info = dataclasses.replace(self.info, **changes)
        self._dirty.set()
        self._news.put_nowait((0, "", ""))

    async def stop(self, deregister: bool = True) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if deregister and self._client is not None and self._client.lease and self._lease_id:
            # Revoking the lease deletes the key at once: routers stop routing here now.
            with contextlib.suppress(Exception):
                await self._client.lease.revoke(self._lease_id, timeout=ETCD_OP_TIMEOUT_S)
        await self._drop_client()
        self.registered.clear()

    async def hand_over(self, ttl: int) -> int | None:
        """Stop keeping the key alive but leave it in etcd, as it is now, on a new lease of
        ``ttl`` seconds for another process to keep alive (a worker restarting in place:
        services/worker/lease_handover.py); returns that lease's id, or None (etcd away: the
        key goes as the old lease runs out). The old lease is revoked: the key moved off it."""
        await cancel_and_wait(self._task)
        self._task = None
        lease: int | None = None
        for _ in range(2):  # the second time on a fresh client
            try:
                c = self._client or await connect_etcd(self.endpoints)
                self._client = c
                assert c.kv is not None and c.lease is not None
                grant = await c.lease.grant(ttl, timeout=ETCD_OP_TIMEOUT_S)
                await c.kv.put(self.key, self.info.to_json(), lease=grant.ID,
                               timeout=ETCD_OP_TIMEOUT_S)  # fmt: skip
                lease = grant.ID
                break
            except Exception as exc:
                log.warning("could not hand the registration of %s over (%s)", self.key, exc)
                await self._drop_client()
        if lease is not None and self._lease_id and self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.lease.revoke(self._lease_id, timeout=ETCD_OP_TIMEOUT_S)  # type: ignore[union-attr]
        await self._drop_client()
        self.registered.clear()
        return lease

    async def _drop_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._register_and_keep_alive()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any etcd failure: start over with a new lease
                log.warning("etcd registration lost (%s); retrying in %.1fs", exc, backoff)
                # A fresh client re-resolves the endpoints and authenticates again (etcd
                # forgets auth tokens when it restarts).
                await self._drop_client()
            self.registered.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _register_and_keep_alive(self) -> None:
        if self._client is None:
            self._client = await connect_etcd(self.endpoints)
        c = self._client
        assert c.kv is not None and c.lease is not None
        grant = await c.lease.grant(self.ttl, timeout=ETCD_OP_TIMEOUT_S)
        self._lease_id = grant.ID
        self._dirty.clear()
        await c.kv.put(
            self.key, self.info.to_json(), lease=self._lease_id, timeout=ETCD_OP_TIMEOUT_S
        )
        self.registrations += 1
        self.registered.set()
        log.info("registered %s (lease %x)", self.key, self._lease_id)
        # The refreshes run in a thread of their own (lease_keeper.py): this loop may be
        # busy for seconds. It reports here, and this loop shows it is alive by ticking.
        loop, lease = asyncio.get_running_loop(), self._lease_id

        def tell(kind: str, detail: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody to tell
                loop.call_soon_threadsafe(self._news.put_nowait, (lease, kind, detail))

        keeper = LeaseKeeper(self.endpoints, self._lease_id, self.ttl, lambda: self._tick, tell,
                             self.stall_limit_s)  # fmt: skip
        self._tick = time.monotonic()
        keeper.start()
        try:
            while True:
                self._tick = time.monotonic()
                about, kind = 0, ""
                with contextlib.suppress(TimeoutError):
                    about, kind, detail = await asyncio.wait_for(self._news.get(),
                                                                 timeout=keeper.interval)  # fmt: skip
                self._tick = time.monotonic()
                if about not in (0, lease):
                    continue  # from the keeper of a lease given up before
                if kind == LOST:
                    raise RuntimeError(detail)
                if kind == RESUMED or self._dirty.is_set():
                    # RESUMED: back from an outage with the lease alive; the key may have gone
                    # meanwhile (etcd restored or wiped), so put it again.
                    self._dirty.clear()
                    await c.kv.put(
                        self.key, self.info.to_json(), lease=self._lease_id,
                        timeout=ETCD_OP_TIMEOUT_S,
                    )  # fmt: skip
        finally:
            keeper.stop()


Listener = Callable[[dict[str, InstanceInfo]], None]


class MembershipWatcher:
    """Keeps ``self.instances`` equal to etcd's view of the cluster (or the last one seen)."""

    def __init__(self, endpoints: list[str], cluster: str, prefix: str | None = None) -> None:
        self.endpoints = endpoints
        self.prefix = prefix or instances_prefix(cluster)  # default: the workers' prefix
        self.instances: dict[str, InstanceInfo] = {}
        self.synced = asyncio.Event()  # first listing done
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    async def start(self) -> None:
        follows = follow_key(self.endpoints, self.prefix, self._listed, self._changed,
                             "etcd watch", prefix=True)  # fmt: skip
        self._task = asyncio.create_task(follows, name="etcd-watcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def _notify(self) -> None:
        for fn in self._listeners:
            try:
                fn(dict(self.instances))
            except Exception:
                log.exception("membership listener failed")

    def _listed(self, kvs: Sequence[Any]) -> None:
        fresh: dict[str, InstanceInfo] = {}
        for kv in kvs:
            info = self._decode(kv.value)
            if info is not None:
                fresh[kv.key.decode()[len(self.prefix) :]] = info
        self.instances = fresh
        self.synced.set()
        self._notify()

    def _changed(self, events: Sequence[Any]) -> None:
        changed = False
        for ev in events:
            iid = ev.kv.key.decode()[len(self.prefix) :]
            if ev.type == 0:  # PUT
                info = self._decode(ev.kv.value)
                if info is not None:
                    self.instances[iid] = info
                    changed = True
            elif self.instances.pop(iid, None) is not None:  # DELETE
                changed = True
        if changed:
            self._notify()

    @staticmethod
    def _decode(value: bytes) -> InstanceInfo | None:
        try:
            return InstanceInfo.from_json(value)
        except (ValueError, TypeError) as exc:
            log.warning("ignoring malformed instance value %r: %s", value[:200], exc)
            return None
