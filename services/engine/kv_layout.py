"""Where each block of the KV cache lives in memory, and the byte ranges that move a
request's blocks from one engine's cache into another's.

The cache is one tensor ``[2 (k/v), layers, blocks, block_size, kv_heads, head_dim]``, so the
(kind, layer, block) slab is contiguous and its address is an affine function of the three
indices. Runs of consecutive source and destination block ids are coalesced into one range.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVLayout:
    base_addr: int  # address of kv_cache[0, 0, 0]
    num_layers: int
    num_blocks: int
    slab_bytes: int  # bytes of one (kind, layer, block) slab
    # Everything that must match for two caches to exchange blocks (model shape, dtype,
    # block size); compared before any transfer.
    fingerprint: str

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
    the given layers (both K and V)."""
    if src.fingerprint != dst.fingerprint:
        raise ValueError(f"incompatible KV caches: {src.fingerprint!r} vs {dst.fingerprint!r}")
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
