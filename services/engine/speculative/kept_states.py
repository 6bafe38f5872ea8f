"""The prefill worker's EAGLE-3 states kept with its prefix-cache blocks (PD).

A prefill worker sends the decode worker the head's inputs (the target's states through the
head's ``fc``) of every prompt position it computed (handoff.py). A prefix-cache hit computes
nothing at the hit positions, so without this the decode worker's head would get no state
there and run over the rest only: its KV at the hit positions would be whatever its blocks
held before (stale), and its drafts worse than after a miss (the tokens stay the same: the
verification decides them). So each full block's states are kept here under the block's
chained hash, in a bounded LRU, and a hit's states are taken from here: the decode worker then
gets the states of every position, as after a miss, and drafts and accepts as after a miss.

NOTE: keyed by the chained hash, as the block manager's cache is, and confirmed by the
block's tokens; the target is deterministic, so equal prefixes have equal states. A block
evicted here but still cached by the block manager (or a hit from another KV tier, which
this worker never computed) ends the run of kept blocks: the states sent start after it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from services.engine.speculative.handoff import DraftStates

KEEP_BYTES = 64 << 20  # per worker: ~28k positions of the default 135M model in float32


class KeptStates:
    """Per full block (by chained hash): its tokens and the states at its positions."""

    def __init__(self, block_size: int, max_bytes: int = KEEP_BYTES):
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._blocks: OrderedDict[int, tuple[tuple[int, ...], torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def complete(self, states: DraftStates, token_ids: list[int], hashes: list[int]) -> DraftStates:
        """``states`` (of a sequence whose tokens are ``token_ids`` and whose full blocks'
        chained hashes are ``hashes``) extended back over the positions before ``states.start``
        from the kept blocks, as far as they reach; then every full block the result covers is
        kept. Never raises for a miss: it returns what it has."""
        bs, start, rows = self.block_size, states.start, [states.hidden]
        while start > 0:
            i = (start - 1) // bs
            got = self._get(hashes, i, token_ids)
            if got is None:
                break
            rows.insert(0, got[: start - i * bs])
            start = i * bs
        hidden = torch.cat(rows) if len(rows) > 1 else states.hidden
        out = DraftStates(start, list(token_ids[start : states.start]) + states.tokens, hidden)
        for i in range(-(-start // bs), min(len(hashes), (start + hidden.shape[0]) // bs)):
            self._put(hashes[i], tuple(token_ids[i * bs : (i + 1) * bs]),
                      hidden[i * bs - start : (i + 1) * bs - start])  # fmt: skip
        return out

    def _get(self, hashes: list[int], i: int, token_ids: list[int]) -> torch.Tensor | None:
        if i >= len(hashes):
            return None
        entry = self._blocks.get(hashes[i])
        bs = self.block_size
        if entry is None or entry[0] != tuple(token_ids[i * bs : (i + 1) * bs]):
            return None
        self._blocks.move_to_end(hashes[i])
        return entry[1]

    def _put(self, block_hash: int, tokens: tuple[int, ...], hidden: torch.Tensor) -> None:
        if block_hash in self._blocks:
            self._blocks.move_to_end(block_hash)
            return
        size = hidden.numel() * hidden.element_size()
        if size > self.max_bytes:
            return
        # A copy: a slice would keep the whole request's tensor alive.
        self._blocks[block_hash] = (tokens, hidden.clone())
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (_, old) = self._blocks.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
