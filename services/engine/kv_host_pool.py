"""The host-memory tier of the KV cache: a fixed pool of block slots, least recently used first."""

from __future__ import annotations

from collections import OrderedDict

import torch


class HostBlockPool:
    """A fixed number of block slots in host memory (pinned for accelerators), keyed by
    block hash, least recently used first."""

    def __init__(
        self, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin: bool
    ):
        self.num_blocks = num_blocks
        self.data = torch.empty((num_blocks, *block_shape), dtype=dtype, pin_memory=pin)
        self.entries: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()
        self.free_slots = list(range(num_blocks - 1, -1, -1))
        # The slots the last ``put`` pushed its older entries out of, in the order it
        # returned them (tensor parallelism: the other ranks read theirs, tp_host_pool.py).
        self.spilled_slots: list[int] = []

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """Slot of a confirmed hit (marked recently used), else None."""
        entry = self.entries.get(block_hash)
        if entry is None or entry[1] != token_ids:
            return None
        self.entries.move_to_end(block_hash)
        return entry[0]

    def put(
        self, hashes: list[int], tokens: list[tuple[int, ...]], data: torch.Tensor
    ) -> tuple[list[int], list[tuple[int, tuple[int, ...], torch.Tensor]]]:
        """Insert blocks (``data``: [n, *block_shape], none already present). Returns the
        hashes inserted and the blocks pushed out, least recently used first, with a copy
        of their KV: older entries when the pool is full, and the oldest of the new blocks
        themselves when there are more of them than slots."""
        keep = max(0, len(hashes) - self.num_blocks)
        spilled = [(hashes[i], tokens[i], data[i]) for i in range(keep)]
        slots: list[int] = []
        evicted: list[tuple[int, tuple[int, ...]]] = []
        evicted_slots: list[int] = []
        for h, t in zip(hashes[keep:], tokens[keep:], strict=True):
            if self.free_slots:
                slot = self.free_slots.pop()
            else:
                old_hash, (slot, old_tokens) = self.entries.popitem(last=False)
                evicted.append((old_hash, old_tokens))
                evicted_slots.append(slot)
            self.entries[h] = (slot, t)
            slots.append(slot)
        if evicted_slots:
            old = self.data[torch.tensor(evicted_slots)]  # copied before being overwritten
            spilled = [(h, t, old[i]) for i, (h, t) in enumerate(evicted)] + spilled
        self.spilled_slots = evicted_slots
        if slots:
            self.data.index_copy_(0, torch.tensor(slots), data[keep:].to(self.data.dtype))
        return hashes[keep:], spilled
