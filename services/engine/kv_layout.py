"""Where each block of the KV cache lives in memory, and the byte ranges that move a
request's blocks from one engine's cache into another's.

The cache is one tensor ``[2 (k/v), layers, blocks, block_size, kv_heads, head_dim]``, so the
(kind, layer, block) slab is contiguous and its address is an affine function of the three
indices. Runs of consecutive source and destination block ids are coalesced into one range.

A layout can come from a peer (a decode worker's reservation): every field and block id is
checked before an address is computed from it, so a bad descriptor is a ``ValueError`` and
never a read or write outside the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

_ADDRESS_SPACE = 1 << 64


@dataclass(frozen=True)
class KVLayout:
    base_addr: int  # address of kv_cache[0, 0, 0]
    num_layers: int
    num_blocks: int
    slab_bytes: int  # bytes of one (kind, layer, block) slab
    # Everything that must match for two caches to exchange blocks (model shape, dtype,
    # block size); compared before any transfer.
    fingerprint: str

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_blocks < 1 or self.slab_bytes < 1:
            raise ValueError(
                f"KV layout needs layers, blocks and slab bytes >= 1, got {self.num_layers}, "
                f"{self.num_blocks}, {self.slab_bytes}"
            )
        if self.base_addr <= 0 or self.base_addr + self.total_bytes > _ADDRESS_SPACE:
            raise ValueError(
                f"KV layout of {self.total_bytes} bytes at {self.base_addr:#x} is not in the "
                "address space"
            )

    @property
    def layer_stride(self) -> int:
        return self.num_blocks * self.slab_bytes

    @property
    def kind_stride(self) -> int:
        return self.num_layers * self.layer_stride

    @property
    def total_bytes(self) -> int:
        return 2 * self.kind_stride

    def addr(self, kind: int, layer: int, block: int) -> int:
        return (
            self.base_addr
            + kind * self.kind_stride
            + layer * self.layer_stride
            + block * self.slab_bytes
        )

    def check_blocks(self, block_ids: list[int], what: str = "block") -> None:
        """ValueError unless every id is a block of this cache."""
        if not block_ids or (min(block_ids) >= 0 and max(block_ids) < self.num_blocks):
            return
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(
                f"{what} ids {bad[:4]} are outside the cache's {self.num_blocks} blocks"
            )

    def check_compatible(self, other: KVLayout) -> None:
        """ValueError unless blocks of ``other`` can be copied into this cache slab by slab."""
        if other.fingerprint != self.fingerprint:
            raise ValueError(
                f"incompatible KV caches: {other.fingerprint!r} vs {self.fingerprint!r}"
            )
        if (other.num_layers, other.slab_bytes) != (self.num_layers, self.slab_bytes):
            raise ValueError(
                f"KV layout of {other.num_layers} layers x {other.slab_bytes}-byte slabs does "
                f"not match this cache's {self.num_layers} x {self.slab_bytes}"
            )


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) runs where both block id lists go up by one."""
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} source blocks but {len(dst)} destination blocks")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def transfer_ranges(
    src: KVLayout, dst: KVLayout, src_blocks: list[int], dst_blocks: list[int], layers: range
) -> tuple[list[int], list[int], list[int]]:
    """Source addresses, destination addresses and lengths that copy the given blocks of
    the given layers (both K and V). ValueError for incompatible layouts, or a block or
    layer outside either cache."""
    dst.check_compatible(src)
    src.check_blocks(src_blocks, "source block")
    dst.check_blocks(dst_blocks, "destination block")
    if layers and not 0 <= min(layers) <= max(layers) < src.num_layers:
        raise ValueError(f"layers {layers} are outside the cache's {src.num_layers} layers")
    srcs: list[int] = []
    dsts: list[int] = []
    lens: list[int] = []
    runs = block_runs(src_blocks, dst_blocks)
    for layer in layers:
        for kind in (0, 1):
            for s, d, n in runs:
                srcs.append(src.addr(kind, layer, s))
                dsts.append(dst.addr(kind, layer, d))
                lens.append(n * src.slab_bytes)
    return srcs, dsts, lens
