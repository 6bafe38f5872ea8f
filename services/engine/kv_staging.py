"""Host staging slots for KV transfer from accelerator memory the transfer engine cannot
register (a CUDA or NPU cache with Mooncake's non-CUDA wheel).

A pool of KV blocks in pinned host memory, laid out like the device cache
(``[k/v, layer, slot, block_size, kv_heads, head_dim]``) so that the same ``KVLayout``
arithmetic addresses it. The prefill side copies each finished layer's blocks into slots and
the transfer engine writes the slots into the decode side's slots; the decode side copies
its slots into the reserved device blocks before decoding. Slots are handed out per request
and given back when its transfer is over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from services.engine.kv_layout import KVLayout


class StagingFull(MemoryError):
    """Not enough free staging slots for a request's blocks."""


class KVStaging:
    def __init__(
        self,
        kv_cache: torch.Tensor,  # the device cache [2, layers, blocks, block_size, heads, dim]
        fingerprint: str,
        num_slots: int,
        register: Callable[[int, int], None] | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"KV staging needs at least one slot, got {num_slots}")
        self.kv_cache = kv_cache
        self.block_size = int(kv_cache.shape[3])
        shape = (2, kv_cache.shape[1], num_slots, *kv_cache.shape[3:])
        pin = kv_cache.device.type != "cpu"
        self.buffer = torch.zeros(shape, dtype=kv_cache.dtype, pin_memory=pin)
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._lock = threading.Lock()
        slab = self.buffer[0, 0, 0]
        self.layout = KVLayout(
            base_addr=int(self.buffer.data_ptr()),
            num_layers=int(shape[1]),
            num_blocks=num_slots,
            slab_bytes=slab.numel() * slab.element_size(),
            fingerprint=fingerprint,
        )
        if register is not None:
            register(self.layout.base_addr, self.layout.total_bytes)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` slots, consecutive where the free list allows (fewer, larger transfers)."""
        with self._lock:
            if n > len(self._free):
                raise StagingFull(f"{n} KV staging slots wanted, {len(self._free)} free")
            self._free.sort(reverse=True)
            return [self._free.pop() for _ in range(n)]

    def free(self, slots: list[int]) -> None:
        with self._lock:
            self._free.extend(slots)

    def stage_out(self, layers: range, block_ids: list[int], slots: list[int]) -> None:
        """Device blocks -> slots, for ``layers`` (both K and V); returns once copied."""
        if not block_ids:
            return
        src = torch.tensor(block_ids, dtype=torch.long, device=self.kv_cache.device)
        dst = torch.tensor(slots, dtype=torch.long)
        part = self.kv_cache[:, layers.start : layers.stop].index_select(2, src)
        self.buffer[:, layers.start : layers.stop].index_copy_(2, dst, part.cpu())

    def stage_in(self, slots: list[int], block_ids: list[int]) -> None:
        """Slots -> device blocks, every layer; returns once copied."""
        if not block_ids:
            return
        src = torch.tensor(slots, dtype=torch.long)
        dst = torch.tensor(block_ids, dtype=torch.long, device=self.kv_cache.device)
        data = self.buffer.index_select(2, src).to(self.kv_cache.device)
        self.kv_cache.index_copy_(2, dst, data)
        if self.kv_cache.device.type != "cpu":
            torch.accelerator.synchronize(self.kv_cache.device)
