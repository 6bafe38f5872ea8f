"""KV layouts that come from a peer are checked before any address is computed from them."""

from __future__ import annotations

import pytest

from services.engine.kv_layout import KVLayout, transfer_ranges

SLAB = 256


def layout(**kw) -> KVLayout:
    fields = dict(base_addr=1 << 20, num_layers=2, num_blocks=8, slab_bytes=SLAB, fingerprint="f")
    return KVLayout(**{**fields, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"num_layers": 0},
        {"num_blocks": 0},
        {"slab_bytes": 0},
        {"base_addr": 0},
        {"base_addr": -4096},
        {"base_addr": (1 << 64) - 4096},  # runs past the end of the address space
        {"num_blocks": 1 << 62},
    ],
)
def test_a_layout_with_impossible_fields_is_refused(bad) -> None:
    with pytest.raises(ValueError):
        layout(**bad)


def test_ranges_stay_inside_both_caches() -> None:
    src, dst = layout(), layout(base_addr=1 << 30)
    srcs, dsts, lens = transfer_ranges(src, dst, [0, 1, 7], [7, 6, 0], range(2))
    for addrs, cache in ((srcs, src), (dsts, dst)):
        for a, n in zip(addrs, lens, strict=True):
            assert cache.base_addr <= a and a + n <= cache.base_addr + cache.total_bytes


@pytest.mark.parametrize(
    ("src_blocks", "dst_blocks"),
    [([0, 1], [-1, 2]), ([-3], [0]), ([0, 8], [0, 1]), ([0], [8]), ([0], [1 << 40])],
)
def test_block_ids_outside_the_cache_are_refused(src_blocks, dst_blocks) -> None:
    with pytest.raises(ValueError, match="outside the cache"):
        transfer_ranges(layout(), layout(base_addr=1 << 30), src_blocks, dst_blocks, range(2))


def test_layers_outside_the_cache_are_refused() -> None:
    with pytest.raises(ValueError, match="layers"):
        transfer_ranges(layout(), layout(), [0], [1], range(1, 3))


@pytest.mark.parametrize(
    "other",
    [{"fingerprint": "g"}, {"num_layers": 3}, {"slab_bytes": SLAB * 2}],
)
def test_mismatched_layouts_are_refused(other) -> None:
    # Same fingerprint but another slab size or depth: a claim no real peer makes, and one
    # that would turn every address computed from it into a wild one.
    with pytest.raises(ValueError):
        transfer_ranges(layout(), layout(**other), [0], [0], range(1))
