"""The encoder cache: LRU by bytes, leased entries kept, memory (un)registered once each."""

from __future__ import annotations

import time

import torch

from services.encoder.cache import EncoderCache


class Registry:
    def __init__(self) -> None:
        self.live: dict[int, int] = {}

    def register(self, addr: int, nbytes: int) -> None:
        assert addr not in self.live
        self.live[addr] = nbytes

    def unregister(self, addr: int) -> None:
        del self.live[addr]


def rows(n: int) -> torch.Tensor:
    return torch.randn(n, 8)  # 32 bytes a row


def test_put_lease_and_lru_eviction():
    reg = Registry()
    cache = EncoderCache(3 * 4 * 32, reg.register, reg.unregister, lease_s=0.0)
    for key in "abc":
        entry = cache.put(key, rows(4))
        assert reg.live[entry.addr] == entry.nbytes == 4 * 32
    assert cache.lease("a") is not None  # a is now the most recently used
    cache.put("d", rows(4))  # over budget: b (least recently used) goes
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert len(reg.live) == 3 and cache.nbytes == 3 * 4 * 32
    got = cache.lease("d")
    assert got is not None and got.embeds.shape == (4, 8)
    cache.clear()
    assert not reg.live and len(cache) == 0


def test_leased_entries_survive_until_the_lease_ends():
    reg = Registry()
    cache = EncoderCache(4 * 32, reg.register, reg.unregister, lease_s=60.0)
    cache.put("a", rows(4))
    cache.put("b", rows(4))  # over budget, but a is leased: the cache grows instead
    assert "a" in cache and "b" in cache and len(reg.live) == 2
    cache.lease_s = 0.0
    cache._entries["a"].leased_until = time.monotonic() - 1
    cache._entries["b"].leased_until = time.monotonic() - 1
    cache.put("c", rows(4))
    assert [k for k in "abc" if k in cache] == ["c"]


def test_same_key_is_stored_once():
    reg = Registry()
    cache = EncoderCache(1 << 20, reg.register, reg.unregister)
    first = cache.put("a", rows(2))
    again = cache.put("a", rows(2))
    assert first is again and len(reg.live) == 1
