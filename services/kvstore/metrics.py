"""Prometheus metrics of the kvstore, read from the index and the master supervisor at
scrape time (the index keeps plain counters; nothing is updated twice)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.common.metrics_http import MetricsEndpoint

if TYPE_CHECKING:
    from services.kvstore.index import KVIndex
    from services.kvstore.master import MasterSupervisor

LABELS = ["instance"]


class KVStoreMetrics(MetricsEndpoint):
    """The registry of one kvstore process and its ``/metrics`` endpoint."""

    def __init__(self, instance: str, index: KVIndex, master: MasterSupervisor | None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(instance, index, master))  # type: ignore[arg-type]


class _Collector:
    def __init__(self, instance: str, index: KVIndex, master: MasterSupervisor | None) -> None:
        self.ids = [instance]
        self.index = index
        self.master = master

    def collect(self) -> Iterable[Metric]:
        ix = self.index

        def family(kind: type, name: str, doc: str, value: float) -> Metric:
            m = kind(name, doc, labels=LABELS)
            m.add_metric(self.ids, value)
            return m  # type: ignore[no-any-return]

        g, c = GaugeMetricFamily, CounterMetricFamily
        yield family(g, "epdserve:kvstore_index_blocks", "Block entries in the global KV index.",
                     len(ix))  # fmt: skip
        yield family(g, "epdserve:kvstore_index_capacity_blocks",
                     "Entry cap of the index (LRU beyond it).", ix.capacity)  # fmt: skip
        yield family(g, "epdserve:kvstore_instances", "Publishers with blocks in the index.",
                     ix.num_instances)  # fmt: skip
        yield family(g, "epdserve:kvstore_store_blocks",
                     "Index entries in the Mooncake Store tier.", ix.store_blocks)  # fmt: skip
        yield family(c, "epdserve:kvstore_lookups", "Lookup calls.", ix.lookups)
        yield family(c, "epdserve:kvstore_lookup_blocks", "Blocks asked about by lookups.",
                     ix.lookup_blocks)  # fmt: skip
        yield family(c, "epdserve:kvstore_hit_blocks",
                     "Looked-up prefix blocks held by some instance or the store.",
                     ix.hit_blocks)  # fmt: skip
        yield family(g, "epdserve:kvstore_hit_rate", "hit_blocks / lookup_blocks (0-1).",
                     ix.hit_rate)  # fmt: skip
        yield family(c, "epdserve:kvstore_evictions", "Entries dropped by the LRU cap.",
                     ix.evictions)  # fmt: skip
        if self.master is not None:
            yield family(c, "epdserve:kvstore_master_restarts",
                         "Times mooncake_master died and was started again.",
                         self.master.restarts)  # fmt: skip
            yield family(g, "epdserve:kvstore_master_up", "1 while mooncake_master is serving.",
                         1.0 if self.master.alive else 0.0)  # fmt: skip
