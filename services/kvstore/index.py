"""The global KV index: which instance holds which KV block, in which tier.

Keys are (model, layout key, chained block hash). A chained hash names a whole prefix
(services/engine/block_manager.py), so a lookup walks a prompt's hashes in order and stops at
the first block nobody holds. Each entry records, per instance, a bit set of local tiers
(DEVICE, HOST: a block may sit in both while it is copied down) and whether the block is in
Mooncake Store, which every instance of the same layout can fetch from.

The index is a cache of what publishers say, so it is allowed to forget: entries beyond
``capacity`` go least-recently-used first, an instance's entries go when it leaves the
cluster, the STORE bits go when the Mooncake master restarts. Each publisher numbers its
batches; a batch from an unknown publisher or after a gap is refused with "resync", and the
publisher answers with a reset batch carrying its whole state.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEVICE = "device"
HOST = "host"
STORE = "store"
TIERS = (DEVICE, HOST, STORE)
_LOCAL_BIT = {DEVICE: 1, HOST: 2}

Key = tuple[str, str, int]  # (model, layout key, block hash)


@dataclass
class _Entry:
    tiers: dict[str, int] = field(default_factory=dict)  # instance -> bit set of local tiers
    in_store: bool = False


@dataclass
class _Publisher:
    incarnation: str
    seq: int  # last batch applied
    keys: set[Key] = field(default_factory=set)  # entries holding this instance


@dataclass
class InstanceMatch:
    """Longest prefix, in blocks, one instance can serve from each reach of tiers."""

    instance_id: str
    device_blocks: int = 0  # all on its device
    host_blocks: int = 0  # all on its device or in its host pool
    total_blocks: int = 0  # all local or in the store


@dataclass
class LookupResult:
    matches: list[InstanceMatch]  # instances with at least one local block matched
    store_blocks: int  # prefix found in the store alone (what any other instance gets)
    num_blocks: int


@dataclass
class KVEventIn:
    """One event as the index applies it (the server converts the proto message)."""

    kind: str  # "stored" | "removed"
    tier: str  # one of TIERS
    block_hashes: Sequence[int]


class KVIndex:
    """In-memory index. Not thread-safe: the server calls it from its event loop only."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        if capacity < 1:
            raise ValueError(f"index capacity must be >= 1 entry, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        self._publishers: dict[str, _Publisher] = {}
        self._store_keys: set[Key] = set()
        self.store_epoch = uuid.uuid4().hex[:12]
        # Statistics (exported by the server).
        self.lookups = 0
        self.lookup_blocks = 0
        self.hit_blocks = 0
        self.evictions = 0

    # ---- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_instances(self) -> int:
        return len(self._publishers)

    @property
    def store_blocks(self) -> int:
        return len(self._store_keys)

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.lookup_blocks if self.lookup_blocks else 0.0

    def instances(self) -> list[str]:
        return sorted(self._publishers)

    def lookup(
        self,
        model: str,
        layout_key: str,
        block_hashes: Sequence[int],
        instance_ids: Iterable[str] = (),
    ) -> LookupResult:
        """Per-instance matched prefix lengths of ``block_hashes`` (a chain, in order)."""
        only = set(instance_ids)
        dev: dict[str, int] = {}
        host: dict[str, int] = {}
        total: dict[str, int] = {}
        store = 0  # leading blocks all in the store
        hit = 0  # leading blocks held anywhere
        for i, h in enumerate(block_hashes):
            key = (model, layout_key, h)
            entry = self._entries.get(key)
            if entry is None:
                break
            progressed = False
            for iid, bits in entry.tiers.items():
                if only and iid not in only:
                    continue
                if dev.get(iid, 0) == i and bits & _LOCAL_BIT[DEVICE]:
                    dev[iid] = i + 1
                if host.get(iid, 0) == i:
                    host[iid] = i + 1
                # Blocks before this one may have come from the store.
                if total.get(iid, store) == i:
                    total[iid] = i + 1
                    progressed = True
            if entry.in_store:
                for iid, n in total.items():
                    if n == i:
                        total[iid] = i + 1
                        progressed = True
                if store == i:
                    store = i + 1
                    progressed = True
            if not progressed:
                break
            self._entries.move_to_end(key)
            hit = i + 1
        self.lookups += 1
        self.lookup_blocks += len(block_hashes)
        self.hit_blocks += hit
        matches = [
            InstanceMatch(iid, dev.get(iid, 0), host.get(iid, 0), max(total[iid], store))
            for iid in sorted(total)
        ]
        return LookupResult(matches, store, len(block_hashes))

    # ---- updates -------------------------------------------------------------------------

    def publish(
        self,
        instance_id: str,
        incarnation: str,
        seq: int,
        model: str,
        layout_key: str,
        events: Iterable[KVEventIn],
        reset: bool = False,
    ) -> bool:
        """Apply one batch. Returns False (nothing applied) when the publisher must resync."""
        pub = self._publishers.get(instance_id)
        if reset:
            self.forget(instance_id)
            pub = self._publishers[instance_id] = _Publisher(incarnation, seq)
        elif pub is None or pub.incarnation != incarnation or seq != pub.seq + 1:
            return False
        pub.seq = seq
        for ev in events:
            if ev.tier not in TIERS:
                raise ValueError(f"unknown tier {ev.tier!r}")
            if ev.kind == "stored":
                self._store(instance_id, pub, model, layout_key, ev.tier, ev.block_hashes)
            elif ev.kind == "removed":
                self._remove(instance_id, pub, model, layout_key, ev.tier, ev.block_hashes)
            else:
                raise ValueError(f"unknown event kind {ev.kind!r}")
        self._evict_over_capacity()
        return True

    def _store(
        self, iid: str, pub: _Publisher, model: str, layout: str, tier: str, hashes: Sequence[int]
    ) -> None:
        for h in hashes:
            key = (model, layout, h)
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
            else:
                self._entries.move_to_end(key)
            if tier == STORE:
                entry.in_store = True
                self._store_keys.add(key)
            else:
                entry.tiers[iid] = entry.tiers.get(iid, 0) | _LOCAL_BIT[tier]
                pub.keys.add(key)

    def _remove(
        self, iid: str, pub: _Publisher, model: str, layout: str, tier: str, hashes: Sequence[int]
    ) -> None:
        for h in hashes:
            key = (model, layout, h)
            entry = self._entries.get(key)
            if entry is None:
                continue
            if tier == STORE:
                entry.in_store = False
                self._store_keys.discard(key)
            elif iid in entry.tiers:
                bits = entry.tiers[iid] & ~_LOCAL_BIT[tier]
                if bits:
                    entry.tiers[iid] = bits
                else:
                    del entry.tiers[iid]
                    pub.keys.discard(key)
            self._drop_if_empty(key, entry)

    def _drop_if_empty(self, key: Key, entry: _Entry) -> None:
        if not entry.tiers and not entry.in_store:
            del self._entries[key]

    def _evict_over_capacity(self) -> None:
        while len(self._entries) > self.capacity:
            key, entry = self._entries.popitem(last=False)
            for iid in entry.tiers:
                pub = self._publishers.get(iid)
                if pub is not None:
                    pub.keys.discard(key)
            self._store_keys.discard(key)
            self.evictions += 1

    def forget(self, instance_id: str) -> int:
        """Drop every local-tier entry of ``instance_id`` and its publisher state (it left
        the cluster, or is about to resend everything). Returns the entries touched."""
        pub = self._publishers.pop(instance_id, None)
        if pub is None:
            return 0
        for key in pub.keys:
            entry = self._entries.get(key)
            if entry is not None and entry.tiers.pop(instance_id, None) is not None:
                self._drop_if_empty(key, entry)
        return len(pub.keys)

    def store_lost(self) -> int:
        """Mooncake Store lost its contents (master restart): drop every STORE bit and start
        a new store epoch, so publishers forget the STORE blocks they believe they put."""
        removed = len(self._store_keys)
        for key in self._store_keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.in_store = False
                self._drop_if_empty(key, entry)
        self._store_keys.clear()
        self.store_epoch = uuid.uuid4().hex[:12]
        return removed
