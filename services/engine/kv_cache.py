"""The paged KV cache as the code around the model sees it: whole blocks read and written.

``ModelRunner`` implements it over its one cache tensor; the KV tiers (host pool, store)
use only this, never the runner. A block's KV covers every layer:
``[k/v, layer, slot, kv_head, head_dim]`` (``block_shape``).

NOTE (tensor parallelism): each rank will hold the KV of its share of the KV heads; an
implementation over the ranks gathers (``read_blocks``) and scatters (``write_blocks``)
along the kv_head axis, so that callers keep seeing whole blocks of the model's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class KVCache(Protocol):
    """Block-granular access to a paged KV cache of ``num_blocks`` blocks."""

    block_size: int  # token slots per block
    num_blocks: int
    dtype: torch.dtype  # of the cache, and of the tensors read and written

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block's KV, all layers: [k/v, layer, slot, kv_head, head_dim]."""
        ...

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A CPU copy of the blocks: [k/v, layer, len(block_ids), slot, kv_head, head_dim]."""
        ...

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Overwrite the blocks with ``data``, shaped as ``read_blocks`` returns it."""
        ...
