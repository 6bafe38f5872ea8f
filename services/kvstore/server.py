"""The KVIndexService servicer: proto messages in and out of the in-memory KVIndex."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from services.common.membership import InstanceInfo
from services.common.proto import kvstore_pb2 as kpb
from services.common.proto import kvstore_pb2_grpc as kpb_grpc
from services.kvstore.index import DEVICE, HOST, STORE, KVEventIn, KVIndex

if TYPE_CHECKING:
    from services.kvstore.master import MasterSupervisor

log = logging.getLogger(__name__)

TIER_FROM_PB = {kpb.KV_TIER_DEVICE: DEVICE, kpb.KV_TIER_HOST: HOST, kpb.KV_TIER_STORE: STORE}
TIER_TO_PB = {v: k for k, v in TIER_FROM_PB.items()}
KIND_FROM_PB = {kpb.KV_EVENT_STORED: "stored", kpb.KV_EVENT_REMOVED: "removed"}
KIND_TO_PB = {v: k for k, v in KIND_FROM_PB.items()}
MAX_LOOKUP_BLOCKS = 1 << 16  # a longer chain is a client bug, not a prompt


def events_from_pb(batch: kpb.KVEventBatch) -> list[KVEventIn]:
    """The batch's events, or ValueError naming the first bad enum value."""
    out = []
    for ev in batch.events:
        if ev.tier not in TIER_FROM_PB:
            raise ValueError(f"unknown KV tier {ev.tier}")
        if ev.kind not in KIND_FROM_PB:
            raise ValueError(f"unknown KV event kind {ev.kind}")
        out.append(KVEventIn(KIND_FROM_PB[ev.kind], TIER_FROM_PB[ev.tier], ev.block_hashes))
    return out


class KVIndexServicer(kpb_grpc.KVIndexServiceServicer):
    """Serves the index. All calls run on the server's event loop, one at a time between
    awaits, so the index needs no lock."""

    def __init__(
        self, index: KVIndex, instance_id: str, master: MasterSupervisor | None = None
    ) -> None:
        self.index = index
        self.instance_id = instance_id
        self.master = master

    # ---- cluster events ------------------------------------------------------------------

    def on_membership(self, instances: dict[str, InstanceInfo]) -> None:
        """MembershipWatcher listener: forget publishers that left the cluster."""
        for iid in self.index.instances():
            if iid not in instances:
                removed = self.index.forget(iid)
                log.info("worker %s left the cluster: forgot %d index entries", iid, removed)

    def on_master_restart(self) -> None:
        removed = self.index.store_lost()
        log.warning("Mooncake Store was lost: dropped %d STORE entries", removed)

    # ---- RPCs ----------------------------------------------------------------------------

    async def Publish(
        self, request: kpb.KVEventBatch, context: grpc.aio.ServicerContext
    ) -> kpb.PublishResponse:
        if not request.instance_id or not request.model:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a KV event batch needs instance_id and model"
            )
        try:
            events = events_from_pb(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        applied = self.index.publish(
            request.instance_id, request.incarnation, request.seq, request.model,
            request.layout_key, events, reset=request.reset,
        )  # fmt: skip
        return kpb.PublishResponse(resync=not applied, store_epoch=self.index.store_epoch)

    async def Lookup(
        self, request: kpb.LookupRequest, context: grpc.aio.ServicerContext
    ) -> kpb.LookupResponse:
        if len(request.block_hashes) > MAX_LOOKUP_BLOCKS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_LOOKUP_BLOCKS} block hashes per lookup, "
                f"got {len(request.block_hashes)}",
            )
        res = self.index.lookup(
            request.model, request.layout_key, request.block_hashes, request.instance_ids
        )
        return kpb.LookupResponse(
            matches=[
                kpb.InstanceMatch(
                    instance_id=m.instance_id,
                    device_blocks=m.device_blocks,
                    host_blocks=m.host_blocks,
                    total_blocks=m.total_blocks,
                )  # fmt: skip
                for m in res.matches
            ],
            store_blocks=res.store_blocks,
            num_blocks=res.num_blocks,
        )

    async def Forget(
        self, request: kpb.ForgetRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ForgetResponse:
        return kpb.ForgetResponse(removed=self.index.forget(request.instance_id))

    async def StoreLost(
        self, request: kpb.StoreLostRequest, context: grpc.aio.ServicerContext
    ) -> kpb.StoreLostResponse:
        removed = self.index.store_lost()
        return kpb.StoreLostResponse(removed=removed, store_epoch=self.index.store_epoch)

    async def Stats(
        self, request: kpb.KVStoreStatsRequest, context: grpc.aio.ServicerContext
    ) -> kpb.KVStoreStatsResponse:
        ix = self.index
        return kpb.KVStoreStatsResponse(
            num_blocks=len(ix), capacity_blocks=ix.capacity, num_instances=ix.num_instances,
            store_blocks=ix.store_blocks, lookups=ix.lookups, lookup_blocks=ix.lookup_blocks,
            hit_blocks=ix.hit_blocks, hit_rate=ix.hit_rate, evictions=ix.evictions,
            master_restarts=self.master.restarts if self.master else 0,
            master_alive=self.master.alive if self.master else False,
            store_epoch=ix.store_epoch,
        )  # fmt: skip

    async def Health(
        self, request: kpb.KVStoreHealthRequest, context: grpc.aio.ServicerContext
    ) -> kpb.KVStoreHealthResponse:
        status = kpb.KVStoreHealthResponse.SERVING
        rpc, url = "", ""
        if self.master is not None:
            rpc, url = self.master.ports.rpc_address, self.master.ports.metadata_url
            if not self.master.alive:
                status = kpb.KVStoreHealthResponse.MASTER_DOWN
        return kpb.KVStoreHealthResponse(
            status=status, instance_id=self.instance_id, master_rpc_address=rpc,
            metadata_url=url, store_epoch=self.index.store_epoch,
        )  # fmt: skip
