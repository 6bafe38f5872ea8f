"""Unit tests of the global KV index: prefix lookup across tiers, resync, forget, LRU cap,
store loss."""

from __future__ import annotations

import pytest

from services.engine.block_hash import hash_prompt_blocks
from services.kvstore.index import DEVICE, HOST, STORE, KVEventIn, KVIndex

M, L = "m", "layout-a"
CHAIN = hash_prompt_blocks(list(range(64)), 8)  # 8 chained block hashes


def stored(tier: str, hashes: list[int]) -> KVEventIn:
    return KVEventIn("stored", tier, hashes)


def removed(tier: str, hashes: list[int]) -> KVEventIn:
    return KVEventIn("removed", tier, hashes)


def publish(ix: KVIndex, iid: str, *events: KVEventIn, seq: int = 1, reset: bool = True) -> bool:
    return ix.publish(iid, f"inc-{iid}", seq, M, L, events, reset=reset)


def matches(ix: KVIndex, hashes: list[int] = CHAIN, **kw) -> dict[str, tuple[int, int, int]]:
    res = ix.lookup(M, L, hashes, **kw)
    return {m.instance_id: (m.device_blocks, m.host_blocks, m.total_blocks) for m in res.matches}


def test_prefix_lookup_per_instance_and_tier() -> None:
    ix = KVIndex()
    publish(ix, "a", stored(DEVICE, CHAIN[:5]))
    publish(ix, "b", stored(DEVICE, CHAIN[:2]), stored(HOST, CHAIN[2:6]))
    assert matches(ix) == {"a": (5, 5, 5), "b": (2, 6, 6)}
    # Stops at the first block an instance lacks, even if it holds later ones.
    publish(ix, "c", stored(DEVICE, [CHAIN[0], CHAIN[2]]))
    assert matches(ix)["c"] == (1, 1, 1)
    # Another layout or model shares nothing.
    assert ix.lookup(M, "layout-b", CHAIN).matches == []
    assert ix.lookup("other", L, CHAIN).matches == []
    # Filtering by instance.
    assert set(matches(ix, instance_ids=["b"])) == {"b"}


def test_store_tier_extends_every_instance() -> None:
    ix = KVIndex()
    publish(ix, "a", stored(DEVICE, CHAIN[:2]), stored(STORE, CHAIN[:6]))
    res = ix.lookup(M, L, CHAIN)
    assert res.store_blocks == 6
    assert matches(ix) == {"a": (2, 2, 6)}
    # A local block after a store-only stretch counts for the total, not for host.
    publish(ix, "b", stored(DEVICE, CHAIN[6:7]))
    assert matches(ix)["b"] == (0, 0, 7)
    assert ix.store_blocks == 6


def test_removed_events_and_overlapping_tiers() -> None:
    ix = KVIndex()
    publish(ix, "a", stored(DEVICE, CHAIN[:4]), stored(HOST, CHAIN[:4]))
    ix.publish("a", "inc-a", 2, M, L, [removed(DEVICE, CHAIN[2:4])])
    assert matches(ix) == {"a": (2, 4, 4)}
    ix.publish("a", "inc-a", 3, M, L, [removed(HOST, CHAIN[:4])])
    assert matches(ix) == {"a": (2, 2, 2)}
    assert len(ix) == 2  # entries nobody holds are gone


def test_gaps_and_unknown_publishers_ask_for_a_resync() -> None:
    ix = KVIndex()
    assert not publish(ix, "a", stored(DEVICE, CHAIN[:1]), reset=False)  # unknown
    assert publish(ix, "a", stored(DEVICE, CHAIN[:1]), seq=1)
    assert not ix.publish("a", "inc-a", 3, M, L, [stored(DEVICE, CHAIN[1:2])])  # gap
    assert not ix.publish("a", "other-inc", 2, M, L, [stored(DEVICE, CHAIN[1:2])])  # restart
    assert matches(ix) == {"a": (1, 1, 1)}  # nothing of the refused batches applied
    # The resync replaces the instance's state.
    assert publish(ix, "a", stored(DEVICE, CHAIN[:3]), seq=7)
    assert ix.publish("a", "inc-a", 8, M, L, [])
    assert matches(ix) == {"a": (3, 3, 3)}


def test_forget_drops_local_tiers_but_not_the_store() -> None:
    ix = KVIndex()
    publish(ix, "a", stored(DEVICE, CHAIN[:4]), stored(STORE, CHAIN[:2]))
    publish(ix, "b", stored(DEVICE, CHAIN[:1]))
    assert ix.forget("a") == 4
    assert ix.forget("a") == 0
    assert matches(ix) == {"b": (1, 1, 2)}
    assert ix.instances() == ["b"]
    assert not ix.publish("a", "inc-a", 2, M, L, [])  # forgotten: must resync


def test_store_lost_drops_store_entries_and_changes_epoch() -> None:
    ix = KVIndex()
    publish(ix, "a", stored(DEVICE, CHAIN[:1]), stored(STORE, CHAIN[:5]))
    epoch = ix.store_epoch
    assert ix.store_lost() == 5
    assert ix.store_epoch != epoch
    res = ix.lookup(M, L, CHAIN)
    assert res.store_blocks == 0
    assert matches(ix) == {"a": (1, 1, 1)}
    assert len(ix) == 1


def test_lru_cap_evicts_least_recently_used() -> None:
    ix = KVIndex(capacity=4)
    other = hash_prompt_blocks(list(range(100, 132)), 8)
    publish(ix, "a", stored(DEVICE, CHAIN[:4]))
    ix.lookup(M, L, CHAIN[:2])  # touches the first two
    ix.publish("a", "inc-a", 2, M, L, [stored(DEVICE, other[:2])])
    assert len(ix) == 4 and ix.evictions == 2
    assert matches(ix) == {"a": (2, 2, 2)}  # blocks 2-3 went, 0-1 stayed
    assert ix.forget("a") == 4  # evicted keys are not counted twice


def test_hit_statistics() -> None:
    ix = KVIndex()
    publish(ix, "a", stored(DEVICE, CHAIN[:2]))
    ix.lookup(M, L, CHAIN)
    assert (ix.lookups, ix.lookup_blocks, ix.hit_blocks) == (1, 8, 2)
    assert ix.hit_rate == pytest.approx(0.25)


def test_bad_events_and_capacity_are_refused() -> None:
    with pytest.raises(ValueError):
        KVIndex(capacity=0)
    ix = KVIndex()
    with pytest.raises(ValueError, match="tier"):
        publish(ix, "a", KVEventIn("stored", "disk", [1]))
