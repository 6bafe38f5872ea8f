"""The router's client of the global KV index: how much of a prompt each worker holds.

The router hashes the prompt into blocks exactly as the engine does (``hash_prompt_blocks``,
with each worker's advertised block size and the chain root the engine gives the prompt: for
a prompt with images, one mixed with the images' content hashes, over the prompt with its
placeholders expanded from each image's grid, which the router sizes itself) and asks the
kvstore, within a short deadline, for each candidate's matched prefix. Routing never waits
on a sick kvstore: a failed or slow lookup leaves the request without cache information (the
policy then weighs load alone) and skips lookups for a moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc

from services.common.grpc_utils import GrpcTLS
from services.common.proto import kvstore_pb2 as kpb
from services.engine.block_hash import (
    ROOT_HASH,
    adapter_hash_root,
    hash_prompt_blocks,
    image_hash_root,
)
from services.kvstore.client import KVStoreLocator
from services.router.routing.policies.base import CachedPrefix, RouteRequest
from services.router.routing.workers import WorkerHandle

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S = 0.25  # a lookup slower than this costs more than it can save
STATS_TIMEOUT_S = 2.0
PAUSE_AFTER_FAILURE_S = 2.0  # no lookups for this long after one failed


def layout_group(h: WorkerHandle) -> tuple[str, int] | None:
    """(KV layout key, block size) a worker advertises; None for one that predates them."""
    layout, block_size = h.info.capacity.get("kv_layout"), h.info.capacity.get("block_size")
    if not layout or not block_size:
        return None
    return str(layout), int(block_size)


def channel_closed_under() -> bool:
    """A CancelledError out of a call on the kvstore's channel is the channel closed under it
    (another caller's ``stub()`` replaced it: the kvstore moved or restarted) unless the
    calling task itself is being cancelled (then it must go on up)."""
    task = asyncio.current_task()
    return task is None or not task.cancelling()


def prompt_hash_root(route: RouteRequest) -> int:
    """Seed of the prompt's block-hash chain, as the engine seeds it (``chain_root``): the
    plain root for text, one mixed with the images' content hashes for a prompt with images
    (whose ``prompt_token_ids`` hold the expanded placeholders, as the engine's do)."""
    root = image_hash_root(route.image_hashes) if route.image_hashes else ROOT_HASH
    return adapter_hash_root(root, route.lora) if route.lora else root


class KVIndexClient:
    """Looks prompts up in the kvstore found in etcd."""

    def __init__(self, etcd_endpoints: list[str], cluster: str, tls: GrpcTLS | None = None) -> None:
        self.locator = KVStoreLocator(etcd_endpoints, cluster, tls)
        self.lookups = 0  # lookups answered
        self.failures = 0  # lookups that failed or timed out
        self._paused_until = 0.0

    async def start(self) -> None:
        await self.locator.start()

    async def stop(self) -> None:
        await self.locator.stop()

    async def annotate(
        self, route: RouteRequest, model: str, candidates: Sequence[WorkerHandle]
    ) -> None:
        """Fill ``route.cached`` for ``candidates`` (one lookup per layout among them)."""
        if not route.prompt_token_ids or time.monotonic() < self._paused_until:
            return
        groups: dict[tuple[str, int], list[str]] = {}
        for h in candidates:
            key = layout_group(h)
            if key is not None:
                groups.setdefault(key, []).append(h.id)
        root = prompt_hash_root(route)
        for (layout, block_size), ids in groups.items():
            hashes = hash_prompt_blocks(list(route.prompt_token_ids), block_size, root)
            if not hashes:
                continue
            resp = await self._lookup(
                kpb.LookupRequest(
                    model=model, layout_key=layout, block_hashes=hashes, instance_ids=ids
                )
            )
            if resp is None:
                return
            for m in resp.matches:
                route.cached[m.instance_id] = CachedPrefix(
                    m.device_blocks * block_size,
                    m.host_blocks * block_size,
                    m.total_blocks * block_size,
                )
            if resp.store_blocks:  # every worker of this layout can fetch from the store
                store = resp.store_blocks * block_size
                for iid in ids:
                    route.cached.setdefault(iid, CachedPrefix(total=store))

    async def _lookup(self, req: kpb.LookupRequest) -> kpb.LookupResponse | None:
        stub, _ = await self.locator.stub()
        if stub is None:
            return None
        try:
            resp: kpb.LookupResponse = await stub.Lookup(req, timeout=LOOKUP_TIMEOUT_S)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            # NOTE: a CancelledError here failed the request being routed (a 500) when the
            # kvstore restarted under its lookup.
            if isinstance(exc, asyncio.CancelledError) and not channel_closed_under():
                raise
            self.failures += 1
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "channel closed"
            log.info("KV index lookup failed (%s); routing on load alone for %.0fs",
                     why, PAUSE_AFTER_FAILURE_S)  # fmt: skip
            return None
        self.lookups += 1
        return resp

    async def status(self) -> dict[str, Any]:
        """The kvstore as `epdserve status` shows it: where, healthy, size, hit rate."""
        info = self.locator.current()
        if info is None:
            return {"present": False}
        out: dict[str, Any] = {
            "present": True, "id": info.id, "address": info.address,
            "master": info.capacity.get("master_rpc_address", ""),
            "router_lookups": self.lookups, "router_lookup_failures": self.failures,
        }  # fmt: skip
        stub, _ = await self.locator.stub()
        if stub is None:  # it left etcd meanwhile
            return {"present": False}
        try:
            stats = await stub.Stats(kpb.KVStoreStatsRequest(), timeout=STATS_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            out.update(healthy=False, error=f"{exc.code().name}: {exc.details()}")
            return out
        except asyncio.CancelledError:
            # NOTE: /admin/status answered 503 while the kvstore restarted under this call.
            if not channel_closed_under():
                raise
            out.update(healthy=False, error="the connection closed during the call (the "
                       "kvstore moved or restarted); retry")  # fmt: skip
            return out
        out.update(
            healthy=True, master_alive=stats.master_alive, blocks=stats.num_blocks,
            capacity_blocks=stats.capacity_blocks, store_blocks=stats.store_blocks,
            instances=stats.num_instances, lookups=stats.lookups, hit_rate=stats.hit_rate,
            master_restarts=stats.master_restarts,
        )  # fmt: skip
        return out
