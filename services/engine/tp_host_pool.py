"""The KV host pool under tensor parallelism: each rank keeps its own heads' blocks in a host
pool of its own, slot for slot the driver's.

The driver's ``KVTierManager`` decides everything: which device blocks are saved to the host
and which come back, and the host slot of each (its ``HostBlockPool`` holds the keys, the
tokens and the LRU order). After doing its own part of a step's moves it sends the other ranks
the same moves (``HostMoves``) through ``RankProcesses.call``, which runs them in the pipe's
order with the batches: before the step's batch, so a restored block holds every rank's heads
before any rank's attention reads it, and after the previous batch, so a saved block is read
before the step overwrites it. A rank's pool is allocated on its first moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.engine.tp_ranks import RankContext

# A rank answers its moves after finishing the batch before them.
MOVES_TIMEOUT_S = 120.0


@dataclass
class HostMoves:
    """One step's host-pool traffic, in the driver's slots and device block ids."""

    num_slots: int  # the pool's size in blocks
    load_slots: list[int]  # host slots read (before the saves may reuse them) ...
    load_blocks: list[int]  # ... into these device blocks (after the saves)
    save_blocks: list[int]  # device blocks copied ...
    save_slots: list[int]  # ... into these host slots


def apply_host_moves(context: RankContext, moves: HostMoves) -> None:
    """``moves`` on this rank's cache and host pool (run on the rank)."""
    runner = context.runner
    pool = context.state.get("host_pool")
    if pool is None:
        shape = (moves.num_slots, *runner.block_shape)
        pin = runner.device.type != "cpu"
        pool = context.state["host_pool"] = torch.empty(shape, dtype=runner.dtype, pin_memory=pin)
    loaded = pool[torch.tensor(moves.load_slots, dtype=torch.long)] if moves.load_slots else None
    if moves.save_blocks:
        kv = runner.read_blocks(moves.save_blocks)  # [2, L, n, ...]
        slots = torch.tensor(moves.save_slots, dtype=torch.long)
        pool.index_copy_(0, slots, kv.permute(2, 0, 1, 3, 4, 5).to(pool.dtype))
    if loaded is not None:
        runner.write_blocks(moves.load_blocks, loaded.permute(1, 2, 0, 3, 4, 5))
