"""The encoder cache: image embeddings by content hash, kept in memory registered with the
Mooncake TransferEngine so that prefill workers read them straight from here.

An entry handed out (its reference sent to a router) is leased for ``lease_s``: the prefill
worker reads it within that time, so eviction skips it until then. Past the byte budget the
least recently used unleased entries go; while every entry is leased the cache grows over
its budget rather than break a hand-off.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Entry:
    embeds: torch.Tensor  # [num_tokens, hidden] float32, contiguous, registered
    leased_until: float = 0.0  # monotonic time until which it must stay

    @property
    def addr(self) -> int:
        return int(self.embeds.data_ptr())

    @property
    def nbytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size()


class EncoderCache:
    def __init__(
        self,
        capacity_bytes: int,
        register: Callable[[int, int], None],
        unregister: Callable[[int], None],
        lease_s: float = 60.0,
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self._register = register
        self._unregister = unregister
        self.lease_s = lease_s
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def lease(self, key: str) -> Entry | None:
        """The entry for ``key`` (most recently used now, leased), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.leased_until = time.monotonic() + self.lease_s
        return entry

    def put(self, key: str, embeds: torch.Tensor) -> Entry:
        """Register ``embeds`` and keep them under ``key``; returns the entry, leased."""
        if key in self._entries:
            entry = self.lease(key)
            assert entry is not None
            return entry
        entry = Entry(embeds.detach().to("cpu", torch.float32).contiguous())
        self._register(entry.addr, entry.nbytes)
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        self.lease(key)
        self._evict()
        return entry

    def _evict(self) -> None:
        now = time.monotonic()
        for key in list(self._entries):
            if self.nbytes <= self.capacity_bytes:
                return
            entry = self._entries[key]
            if entry.leased_until > now:
                continue
            del self._entries[key]
            self._unregister(entry.addr)
            self.nbytes -= entry.nbytes

    def clear(self) -> None:
        for entry in self._entries.values():
            self._unregister(entry.addr)
        self._entries.clear()
        self.nbytes = 0
