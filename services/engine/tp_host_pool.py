"""The KV tiers under tensor parallelism: each rank keeps its own heads' blocks in a host pool
of its own, slot for slot the driver's, and the store holds whole blocks (every rank's heads).

The driver's ``KVTierManager`` decides everything: which device blocks are saved to the host
and which come back, and the host slot of each (its ``HostBlockPool`` holds the keys, the
tokens and the LRU order). After doing its own part of a step's moves it sends the other ranks
the same moves (``HostMoves``) through ``RankProcesses.call``, which runs them in the pipe's
order with the batches: before the step's batch, so a restored block holds every rank's heads
before any rank's attention reads it, and after the previous batch, so a saved block is read
before the step overwrites it. A rank's pool is allocated on its first moves.

The store (Mooncake Store) is shared with other workers, so its values are whole blocks, the
same bytes and key a one-device worker of the model writes (``whole_fingerprint``): a block
written through is gathered from every rank (``RankTiers.whole``), and a block read from it is
cut into each rank's heads (``keep`` for the driver, the moves for the others). Blocks the
host pool pushes out are written to the store whole too, as with one device: the other ranks
send their heads of them back with the step's moves, read from their pools before the saves
reuse the slots (or from their devices: new blocks the pool had no room for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from services.engine.block_manager import CachedBlock
    from services.engine.kv_host_pool import HostBlockPool
    from services.engine.scheduler_output import KVLoad
    from services.engine.tp_rank_process import RankContext
    from services.engine.tp_ranks import RankProcesses

# A rank answers its moves after finishing the batch before them.
MOVES_TIMEOUT_S = 120.0

# A block pushed out of the host pool: (hash, tokens, KV [2, L, slot, heads, dim]).
Spilled = tuple[int, tuple[int, ...], torch.Tensor]


def head_span(total: int, size: int, rank: int) -> tuple[int, int]:
    """(first KV head, number of KV heads) of ``rank``, as tp_shard.shard_attention cuts them
    (one replicated head per rank when there are more ranks than heads)."""
    if total >= size:
        return rank * (total // size), total // size
    return rank * total // size, 1


def whole_fingerprint(runner: Any) -> str:
    """The runner's KV layout fingerprint with every rank's heads (a store key's part)."""
    fp = str(runner.layout.fingerprint)
    if runner.ranks is None:
        return fp
    return fp.replace(f"-H{runner.num_kv_heads}-", f"-H{runner.ranks.num_kv_heads}-", 1)


@dataclass
class HostMoves:
    """One step's tier traffic, in the driver's slots and device block ids."""

    num_slots: int  # the pool's size in blocks
    load_slots: list[int]  # host slots read (before the saves may reuse them) ...
    load_blocks: list[int]  # ... into these device blocks (after the saves)
    save_blocks: list[int]  # device blocks copied ...
    save_slots: list[int]  # ... into these host slots
    store_blocks: list[int]  # device blocks filled from the store (after the saves) ...
    store_kv: torch.Tensor | None  # ... with these whole blocks [n, 2, L, slot, heads, dim]
    spans: list[tuple[int, int]]  # each rank's KV heads (head_span)
    # Blocks pushed out of the host pool, sent back for the store (before the saves):
    spill_slots: list[int]  # out of these host slots, then ...
    spill_blocks: list[int]  # ... these device blocks (the pool had no room for them)


class RankTiers:
    """The driver's side of the tiers' traffic with the other ranks."""

    def __init__(self, ranks: RankProcesses, block_shape: tuple[int, ...]) -> None:
        self.ranks = ranks
        size, self.total = len(ranks.procs) + 1, ranks.num_kv_heads
        self.spans = [head_span(self.total, size, r) for r in range(size)]
        # A store value: [k/v, layer, slot, every KV head, head_dim].
        self.full_shape = (*block_shape[:3], self.total, *block_shape[4:])
        self._from_store: list[tuple[int, torch.Tensor]] = []  # this step's (block, whole KV)
        self._spilled: tuple[list[Spilled], list[int], list[int]] = ([], [], [])

    def keep(self, block_id: int, whole: torch.Tensor) -> torch.Tensor:
        """The driver's heads of a store hit (its whole KV kept for the other ranks)."""
        self._from_store.append((block_id, whole))
        start, n = self.spans[0]
        return whole[:, :, :, start : start + n]

    def spill(self, spilled: list[Spilled], slots: list[int], evicted: list[CachedBlock]) -> None:
        """Blocks the host pool just pushed out (the driver's heads; ``slots``: the pool slots
        of the first ones, the rest are the first of ``evicted``), written to the store whole
        by the step's ``follow``."""
        blocks = [e.block_id for e in evicted[: len(spilled) - len(slots)]]
        self._spilled = (spilled, list(slots), blocks)

    def follow(
        self,
        host: HostBlockPool,
        loads: list[KVLoad],
        slots: list[int | None],
        evicted: list[CachedBlock],
    ) -> list[Spilled]:
        """Have the other ranks make the step's moves the driver just made; returns the
        blocks the host pool pushed out (``spill``) with every rank's heads."""
        entries = host.entries
        saved = [e for e in evicted if e.block_hash in entries]  # not spilled at once
        hosted = [(x.block_id, s) for x, s in zip(loads, slots, strict=True) if s is not None]
        stored, self._from_store = self._from_store, []
        spilled, spill_slots, spill_blocks = self._spilled
        self._spilled = ([], [], [])
        moves = HostMoves(
            host.num_blocks, [s for _, s in hosted], [b for b, _ in hosted],
            [e.block_id for e in saved], [entries[e.block_hash][0] for e in saved],
            [b for b, _ in stored], torch.stack([kv for _, kv in stored]) if stored else None,
            self.spans, spill_slots, spill_blocks,
        )  # fmt: skip
        theirs = self.ranks.call(apply_host_moves, moves, timeout=MOVES_TIMEOUT_S)
        if not spilled:
            return []
        whole = self._join([torch.stack([kv for _, _, kv in spilled]), *theirs])
        return [(h, t, whole[i]) for i, (h, t, _) in enumerate(spilled)]

    def whole(self, block_ids: list[int], mine: torch.Tensor) -> torch.Tensor:
        """Every rank's heads of the blocks ([2, L, n, slot, heads, dim]), given the driver's."""
        return self._join([mine, *self.ranks.call(read_rank_blocks, block_ids,
                                                  timeout=MOVES_TIMEOUT_S)])  # fmt: skip

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Each rank's part (in rank order, its heads in dimension 4) joined."""
        first = parts[0]
        out = first.new_empty((*first.shape[:4], self.total, *first.shape[5:]))
        for (start, n), part in zip(self.spans, parts, strict=True):
            out[:, :, :, :, start : start + n] = part
        return out


# ---- run on ranks 1..N-1 (RankProcesses.call) -------------------------------------------------


def read_rank_blocks(context: RankContext, block_ids: list[int]) -> torch.Tensor:
    return context.runner.read_blocks(block_ids)


def apply_host_moves(context: RankContext, moves: HostMoves) -> torch.Tensor | None:
    """``moves`` on this rank's cache and host pool; returns this rank's heads of the blocks
    pushed out of the pool ([n, *block_shape]), None if none were."""
    runner = context.runner
    pool = context.state.get("host_pool")
    if pool is None:
        shape = (moves.num_slots, *runner.block_shape)
        pin = runner.device.type != "cpu"
        pool = context.state["host_pool"] = torch.empty(shape, dtype=runner.dtype, pin_memory=pin)
    spilled = None
    if moves.spill_slots or moves.spill_blocks:
        parts = [pool[torch.tensor(moves.spill_slots, dtype=torch.long)]]
        if moves.spill_blocks:
            parts.append(runner.read_blocks(moves.spill_blocks).permute(2, 0, 1, 3, 4, 5).cpu())
        spilled = torch.cat(parts)
    loaded = pool[torch.tensor(moves.load_slots, dtype=torch.long)] if moves.load_slots else None
    if moves.save_blocks:
        kv = runner.read_blocks(moves.save_blocks)  # [2, L, n, ...]
        slots = torch.tensor(moves.save_slots, dtype=torch.long)
        pool.index_copy_(0, slots, kv.permute(2, 0, 1, 3, 4, 5).to(pool.dtype))
    if loaded is not None:
        runner.write_blocks(moves.load_blocks, loaded.permute(1, 2, 0, 3, 4, 5))
    if moves.store_kv is not None:
        start, n = moves.spans[context.rank]
        mine = moves.store_kv[:, :, :, :, start : start + n]
        runner.write_blocks(moves.store_blocks, mine.permute(1, 2, 0, 3, 4, 5).contiguous())
    return spilled
