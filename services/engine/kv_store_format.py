"""The shared block store as the KV tiers see it (kv_tiers.py): its interface (``StoreTier``;
Mooncake Store implements it in services/kvstore/store_tier.py) and the format of its values
(``BlockCodec``: a block's KV and its tokens, which confirm a hit)."""

from __future__ import annotations

from typing import Protocol

import torch


class StoreTier(Protocol):
    """A shared block store. Implementations never raise for store trouble: a failure is
    a miss (``get_blocks``) or a block not stored (``put_blocks``)."""

    def put_blocks(self, hashes: list[int], values: list[bytes]) -> list[int]:
        """Store the values under the hashes; returns the hashes actually stored."""
        ...

    def get_blocks(self, hashes: list[int]) -> list[bytes]:
        """Values of the longest leading run of ``hashes`` present in the store."""
        ...

    def close(self) -> None: ...


class BlockCodec:
    """One block's KV ([2, layers, block_size, kv_heads, head_dim]) plus its tokens as
    bytes, the store's value format; a value of the wrong size decodes to None."""

    def __init__(self, block_shape: tuple[int, ...], dtype: torch.dtype, block_size: int):
        self.block_shape = block_shape
        self.dtype = dtype
        self.kv_bytes = torch.Size(block_shape).numel() * torch.empty((), dtype=dtype).itemsize
        self.nbytes = self.kv_bytes + 4 * block_size

    def encode(self, kv: torch.Tensor, token_ids: tuple[int, ...]) -> bytes:
        raw = kv.contiguous().view(torch.uint8).numpy().tobytes()
        return raw + torch.tensor(token_ids, dtype=torch.int32).numpy().tobytes()

    def decode(self, value: bytes) -> tuple[tuple[int, ...], torch.Tensor] | None:
        if len(value) != self.nbytes:
            return None
        buf = bytearray(value)
        kv = torch.frombuffer(buf, dtype=torch.uint8, count=self.kv_bytes)
        tokens = torch.frombuffer(buf, dtype=torch.int32, offset=self.kv_bytes)
        return tuple(tokens.tolist()), kv.view(self.dtype).view(self.block_shape)
