"""Publishes this worker's KV-cache events to the cluster's global KV index (the kvstore).

Every ``interval_s`` the publisher takes the engine's KVEvents (between two engine steps),
folds them into a mirror of what this worker holds per tier, and sends them as one batch to
the kvstore it finds in etcd. Batches are numbered; whenever the index may have lost track
(first contact, a call that failed, a kvstore restart, a "resync" answer) the next batch is
a reset carrying the whole mirror instead, so a restarted kvstore converges without any
worker restarting. With no kvstore in etcd the events only update the mirror.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import grpc

from services.common.aio import cancel_and_wait
from services.common.grpc_utils import GrpcTLS
from services.common.proto import kvstore_pb2 as kpb
from services.engine.tp_host_pool import whole_fingerprint
from services.kvstore.client import KVStoreLocator

log = logging.getLogger(__name__)

TIER_TO_PB = {"device": kpb.KV_TIER_DEVICE, "host": kpb.KV_TIER_HOST, "store": kpb.KV_TIER_STORE}
KIND_TO_PB = {"stored": kpb.KV_EVENT_STORED, "removed": kpb.KV_EVENT_REMOVED}


def kv_layout_key(llm_engine: Any) -> str:
    """The KV layout fingerprint (model shape, dtype, block size): blocks are shared in the
    index only between workers whose keys are equal. With tensor parallelism it is the whole
    model's (every rank's KV heads, as the store's keys: tp_host_pool.whole_fingerprint): a
    worker's blocks are indexed once whatever its size, and a prefix a TP worker holds or
    wrote to the store counts for workers of any size."""
    return whole_fingerprint(llm_engine.runner)


class TierMirror:
    """The block hashes this worker holds, per tier, as its events say."""

    def __init__(self) -> None:
        self.tiers: dict[str, set[int]] = {t: set() for t in TIER_TO_PB}

    def apply(self, kind: str, tier: str, hashes: Iterable[int]) -> None:
        held = self.tiers[tier]
        if kind == "stored":
            held.update(hashes)
        else:
            held.difference_update(hashes)

    def as_events(self) -> list[kpb.KVEvent]:
        return [
            kpb.KVEvent(kind=kpb.KV_EVENT_STORED, tier=TIER_TO_PB[t], block_hashes=sorted(h))
            for t, h in self.tiers.items()
            if h
        ]


class KVEventPublisher:
    """Drains ``engine``'s KV events and keeps the kvstore's view of this worker current."""

    def __init__(
        self,
        engine: Any,  # AsyncLLMEngine: ``call(fn)`` runs fn(LLMEngine) between steps
        instance_id: str,
        incarnation: str,
        model: str,
        layout_key: str,
        etcd_endpoints: list[str],
        cluster: str,
        tls: GrpcTLS | None = None,
        interval_s: float = 0.1,
        timeout_s: float = 2.0,
        heartbeat_s: float = 2.0,
    ) -> None:
        self.engine = engine
        self.instance_id = instance_id
        self.incarnation = incarnation
        self.model = model
        self.layout_key = layout_key
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.mirror = TierMirror()
        self.locator = KVStoreLocator(etcd_endpoints, cluster, tls)
        self.published_batches = 0  # tests and logs read these
        self.resyncs = 0
        self._pending: list[kpb.KVEvent] = []
        self._seq = 0
        self._need_reset = True
        self._store_epoch = ""
        self._last_sent = 0.0  # loop time of the last batch sent
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.locator.start()
        self._task = asyncio.create_task(self._run(), name="kv-event-publisher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.locator.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the engine died or a bug: keep the worker, say it once
                log.exception("KV event publishing failed")
                await asyncio.sleep(1.0)

    async def take_events(self) -> None:
        """Move the engine's new events into the mirror and the pending batch."""
        events = await self.engine.call(lambda e: e.take_kv_events())
        for ev in events:
            tier = getattr(ev, "tier", "device")  # engines without tiers report the device
            self.mirror.apply(ev.kind, tier, ev.block_hashes)
            self._pending.append(
                kpb.KVEvent(
                    kind=KIND_TO_PB[ev.kind], tier=TIER_TO_PB[tier], block_hashes=ev.block_hashes
                )
            )

    async def publish_once(self) -> None:
        """One round: take events, then send a batch (a reset one when needed)."""
        await self.take_events()
        stub, changed = await self.locator.stub()
        if changed:
            self._need_reset = True
        if stub is None:
            self._pending.clear()  # nobody to tell; the mirror keeps the state
            return
        # NOTE: an empty batch now and then lets an index that forgot us (this worker's
        # lease lapsed for a moment) ask for the resync without waiting for new events.
        now = asyncio.get_running_loop().time()
        if not self._pending and not self._need_reset and now - self._last_sent < self.heartbeat_s:
            return
        self._last_sent = now
        for _ in range(2):  # an incremental batch answered "resync" is followed by a reset
            batch = self._next_batch()
            try:
                resp = await stub.Publish(batch, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                # It may or may not have been applied: start over with a reset next time.
                log.info("kvstore publish failed (%s); will resync", exc.code().name)
                self._need_reset = True
                return
            self.published_batches += 1
            self._note_store_epoch(resp.store_epoch)
            if not resp.resync:
                return
            self.resyncs += 1
            self._need_reset = True

    def _next_batch(self) -> kpb.KVEventBatch:
        self._seq += 1
        batch = kpb.KVEventBatch(
            instance_id=self.instance_id, incarnation=self.incarnation, model=self.model,
            layout_key=self.layout_key, seq=self._seq, reset=self._need_reset,
        )  # fmt: skip
        batch.events.extend(self.mirror.as_events() if self._need_reset else self._pending)
        self._pending = []
        self._need_reset = False
        return batch

    def _note_store_epoch(self, epoch: str) -> None:
        """Mooncake Store lost its contents: so did our STORE tier."""
        if self._store_epoch and epoch != self._store_epoch:
            log.info("Mooncake Store restarted: forgetting %d STORE blocks",
                     len(self.mirror.tiers["store"]))  # fmt: skip
            self.mirror.tiers["store"].clear()
        self._store_epoch = epoch
