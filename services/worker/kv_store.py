"""The worker's KV store tier: Mooncake Store below the engine's device cache and host pool,
at the master ``--kv-store`` names, or (``auto``) the one the kvstore advertises in etcd."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from services.common.membership import InstanceInfo
from services.engine.tp_host_pool import whole_fingerprint
from services.kvstore.client import pick_kvstore
from services.kvstore.store_tier import MooncakeStoreTier, StoreConfig
from services.worker.config import WorkerConfig

if TYPE_CHECKING:
    from services.engine.async_engine import AsyncLLMEngine

log = logging.getLogger(__name__)


def advertised_store(wcfg: WorkerConfig, instances: dict[str, InstanceInfo]) -> StoreConfig | None:
    """The store of the kvstore workers publish to (its etcd value names its master)."""
    info = pick_kvstore(instances)
    if info is None:
        return None
    master = info.capacity.get("master_rpc_address")
    metadata_url = info.capacity.get("metadata_url")
    if not master or not metadata_url:
        return None  # a kvstore running without a master (--no-master)
    return _config(wcfg, str(master), str(metadata_url))


def _config(wcfg: WorkerConfig, master: str, metadata_url: str) -> StoreConfig:
    return StoreConfig(
        master, metadata_url, local_host=wcfg.advertise_host or wcfg.host,
        segment_bytes=wcfg.kv_store_segment_bytes, protocol=wcfg.mooncake_protocol,
        device=wcfg.mooncake_device,
    )  # fmt: skip


async def attach_kv_store(
    wcfg: WorkerConfig,
    engine: AsyncLLMEngine,
    kvstores: Callable[[], dict[str, InstanceInfo]] | None,
) -> MooncakeStoreTier | None:
    """Give ``engine`` its store tier when ``--kv-store`` asks for one. ``kvstores``: the
    kvstore processes etcd lists now (for ``auto``). The tier connects lazily, from the
    engine's background store threads, so a store that is not there yet only means misses."""
    if not wcfg.kv_store:
        return None
    llm_engine = engine.engine
    assert llm_engine is not None
    source: StoreConfig | Callable[[], StoreConfig | None]
    if wcfg.kv_store == "auto":
        assert kvstores is not None, "--kv-store auto needs etcd"
        source = lambda: advertised_store(wcfg, kvstores())  # noqa: E731
    else:
        source = _config(wcfg, wcfg.kv_store, wcfg.kv_store_metadata)
    # NOTE: the whole model's layout: a tensor-parallel worker stores whole blocks, the values
    # a one-device worker of the model stores (services/engine/tp_host_pool.py).
    store = MooncakeStoreTier(source, llm_engine.model_name, whole_fingerprint(llm_engine.runner))
    await engine.call(lambda e: e.attach_kv_store(store))
    log.info("KV store tier: %s", wcfg.kv_store)
    return store
