"""Host staging slots for KV transfer (``services/engine/kv_staging.py``)."""

from __future__ import annotations

import pytest
import torch

from services.engine.kv_staging import KVStaging, StagingFull


def make_cache(num_blocks: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, num_blocks, 4, 2, 8, generator=g)


def test_layout_addresses_the_buffer_and_is_registered():
    registered = []
    staging = KVStaging(make_cache(), "fp", 5, register=lambda a, n: registered.append((a, n)))
    layout = staging.layout
    assert registered == [(layout.base_addr, staging.buffer.numel() * 4)]
    for kind, layer, slot in ((0, 0, 0), (1, 2, 4), (0, 1, 3)):
        assert layout.addr(kind, layer, slot) == staging.buffer[kind, layer, slot].data_ptr()
    assert layout.fingerprint == "fp" and layout.num_blocks == 5


def test_blocks_round_trip_through_slots_layer_by_layer():
    src, dst = make_cache(seed=1), make_cache(seed=2)
    out = KVStaging(src, "fp", 6)
    into = KVStaging(dst, "fp", 6)
    blocks, slots = [7, 2, 5], out.allocate(3)
    for layer in range(3):  # as the prefill side does, one layer at a time
        out.stage_out(range(layer, layer + 1), blocks, slots)
    # The transfer engine's part: slot bytes from one buffer into the other's slots.
    dst_slots = into.allocate(3)
    into.buffer[:, :, dst_slots] = out.buffer[:, :, slots]
    before = dst.clone()
    into.stage_in(dst_slots, [0, 9, 4])
    for s, d in zip(blocks, [0, 9, 4], strict=True):
        assert torch.equal(dst[:, :, d], src[:, :, s])
    untouched = [b for b in range(10) if b not in (0, 9, 4)]
    assert torch.equal(dst[:, :, untouched], before[:, :, untouched])


def test_slots_are_handed_out_and_back():
    staging = KVStaging(make_cache(), "fp", 4)
    a = staging.allocate(3)
    assert a == [0, 1, 2] and staging.num_free == 1
    with pytest.raises(StagingFull, match="3 KV staging slots wanted, 1 free"):
        staging.allocate(3)
    staging.free(a)
    assert staging.num_free == 4 and staging.allocate(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="at least one slot"):
        KVStaging(make_cache(), "fp", 0)
