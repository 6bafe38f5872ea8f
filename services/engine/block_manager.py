"""Paged KV-cache block allocator with reference counts and prefix caching.

A full block is identified by a chained hash (block_hash.py): hash(parent block's hash, the
block's tokens), so equal hashes mean equal prefixes up to and including the block. A hit is still
confirmed by comparing the stored tokens and the parent block's hash (a 64-bit hash can
collide: equal tokens after a different prefix, or at another position, are not a hit). Blocks nobody
references but that hold a cached prefix stay resident and are evicted least-recently-used
first when fresh blocks run out. Every registration and eviction is recorded as a KVEvent
(the router's cache-aware routing and the global KV index consume them).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.engine.block_hash import ROOT_HASH, hash_block

if TYPE_CHECKING:
    from services.engine.sequence import Sequence


def chain_root(seq: Sequence) -> int:
    """Seed of ``seq``'s hash chain: ``ROOT_HASH`` for text; mixed with the image hashes for
    a prompt with images, whose pad tokens alone do not say which image they stand for; with
    a LoRA adapter, that seed mixed with the adapter's id (``Sequence.lora_root``)."""
    if seq.lora_root is not None:
        return seq.lora_root
    return seq.mm.hash_root if seq.mm is not None else ROOT_HASH


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and registered
    token_ids: tuple[int, ...] = ()  # the block's tokens, kept to confirm hash hits
    parent_hash: int | None = None  # the previous block's hash (or the chain root), too


@dataclass
class KVEvent:
    """Block hashes that became available in (``stored``) or left (``removed``) one tier
    of this engine's cache."""

    kind: str  # "stored" or "removed"
    block_hashes: list[int] = field(default_factory=list)
    tier: str = "device"  # "device", "host" (host pool) or "store" (Mooncake Store)


@dataclass(frozen=True)
class CachedBlock:
    """A device block holding a cached prefix block, as handed to the tiers below."""

    block_id: int
    block_hash: int
    token_ids: tuple[int, ...]


@dataclass
class ComputedBlocks:
    """Result of a prefix-cache lookup: cached blocks usable for a sequence's prefix."""

    block_ids: list[int]
    block_hashes: list[int]

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


class BlockManager:
    """Hands out KV-cache blocks to sequences. Pure Python; no tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # no content worth keeping
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self.hash_to_block: dict[int, int] = {}
        # Blocks a peer may still write into (freed PD reservations), in no pool until
        # release_quarantined.
        self.quarantined: set[int] = set()
        self._events: list[KVEvent] = []
        # When tiers below want them: cached blocks evicted (take_evicted) and blocks newly
        # registered (take_registered) since the last call.
        self.feed_tiers = False
        self._evicted: list[CachedBlock] = []
        self._registered: list[CachedBlock] = []
        # Prefix-cache statistics: prompt tokens looked up and tokens found.
        self.lookup_tokens = 0
        self.hit_tokens = 0

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def take_evicted(self) -> list[CachedBlock]:
        """Cached blocks handed out for new tokens since the last call. Their KV is intact
        until the next model run or KV import, so the caller copies it out first."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def take_registered(self) -> list[CachedBlock]:
        """Blocks registered in the prefix cache since the last call."""
        registered, self._registered = self._registered, []
        return registered

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self.hash_to_block

    def prompt_block_hashes(self, seq: Sequence) -> list[int]:
        """Chained hashes of the blocks a prefix hit of ``seq`` can cover (all full blocks
        but the one holding the last token, which is always computed)."""
        bs = self.block_size
        hashes: list[int] = []
        parent = chain_root(seq)
        for i in range((seq.num_tokens - 1) // bs):
            parent = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)
        return hashes

    def get_computed_blocks(self, seq: Sequence) -> ComputedBlocks:
        """Longest cached prefix of ``seq`` in whole blocks. Leaves at least one token to
        compute, since the step that computes the last token is the one that samples."""
        if not self.enable_prefix_caching or seq.block_table:
            return ComputedBlocks([], [])
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        ids: list[int] = []
        hashes: list[int] = []
        parent = chain_root(seq)
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block_hash = hash_block(parent, tokens)
            bid = self.hash_to_block.get(block_hash)
            if bid is None or not self._holds(self.blocks[bid], parent, tokens):
                break
            ids.append(bid)
            hashes.append(block_hash)
            parent = block_hash
        return ComputedBlocks(ids, hashes)

    @staticmethod
    def _holds(block: Block, parent: int, tokens: tuple[int, ...]) -> bool:
        """Whether ``block`` is the block ``tokens`` after the prefix hashed ``parent``."""
        return block.parent_hash == parent and block.token_ids == tokens

    # ---- allocation ----------------------------------------------------------------------

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed: ComputedBlocks | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``seq`` (after ``computed``, the
        prefix-cache hit of a first allocation). All or nothing: returns False, changing
        nothing, when there are not enough free blocks."""
        computed = computed or ComputedBlocks([], [])
        num_cached = computed.num_blocks * self.block_size
        total_tokens = max(seq.num_computed_tokens, num_cached) + num_new_tokens
        have = len(seq.block_table) + computed.num_blocks
        need = max(0, self.blocks_needed(total_tokens) - have)
        # Cache hits that sit in the evictable pool stop being free once referenced.
        reclaimed = sum(1 for b in computed.block_ids if self.blocks[b].ref_count == 0)
        if need > self.num_free_blocks - reclaimed:
            return False
        if computed.num_blocks:
            for bid in computed.block_ids:
                block = self.blocks[bid]
                if block.ref_count == 0:
                    self.evictable.pop(bid, None)
                block.ref_count += 1
            seq.block_table.extend(computed.block_ids)
            seq.block_hashes.extend(computed.block_hashes)
            seq.num_computed_tokens = num_cached
        # NOTE: ascending ids, whatever order the pools hand them out in (freed and evicted
        # blocks come back tail first): runs of consecutive ids are contiguous memory per
        # layer, so a PD push moves them as one range instead of one range per block.
        seq.block_table.extend(sorted(self._take_free_block() for _ in range(need)))
        return True

    def note_lookup(self, seq: Sequence, num_hit_tokens: int) -> None:
        """Count one prompt's prefix-cache lookup in the hit-rate statistics."""
        seq.num_cached_tokens = num_hit_tokens
        self.lookup_tokens += seq.num_tokens
        self.hit_tokens += num_hit_tokens

    def _take_free_block(self) -> int:
        if self.free_ids:
            bid = self.free_ids.popleft()
        else:
            bid, _ = self.evictable.popitem(last=False)
            block = self.blocks[bid]
            if self.feed_tiers and block.block_hash is not None:
                self._evicted.append(CachedBlock(bid, block.block_hash, block.token_ids))
            self._forget(block)
        block = self.blocks[bid]
        assert block.ref_count == 0, block
        block.ref_count = 1
        return bid

    def _forget(self, block: Block) -> None:
        if block.block_hash is not None:
            if self.hash_to_block.get(block.block_hash) == block.block_id:
                del self.hash_to_block[block.block_hash]
                self._events.append(KVEvent("removed", [block.block_hash]))
            block.block_hash = None
            block.token_ids = ()
            block.parent_hash = None

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references. Tail blocks are released first so that, among equally
        old blocks, the end of a prefix is evicted before its (more shareable) beginning."""
        self._release(reversed(seq.block_table))
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _release(self, block_ids: Iterable[int]) -> None:
        for bid in block_ids:
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, block
            if block.ref_count == 0:
                if block.block_hash is not None and self.enable_prefix_caching:
                    self.evictable[bid] = None
                else:
                    self._forget(block)
                    self.free_ids.append(bid)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release ``seq``'s blocks past those ``num_tokens`` tokens fill (lookahead slots of
        rejected draft tokens: never registered, since their KV was never computed)."""
        keep = self.blocks_needed(num_tokens)
        extra, seq.block_table = seq.block_table[keep:], seq.block_table[:keep]
        self._release(reversed(extra))

    def free_quarantined(self, seq: Sequence, first: int) -> list[int]:
        """``free`` for a PD reservation that a peer may still write into from block index
        ``first`` on (the blocks before it are prefix-cache hits the peer never writes): those
        blocks leave every pool until ``release_quarantined``. Returns them."""
        written, seq.block_table = seq.block_table[first:], seq.block_table[:first]
        out = []
        for bid in written:
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, block
            if block.ref_count == 0:
                self._forget(block)
                self.quarantined.add(bid)
                out.append(bid)
        self.free(seq)
        return out

    def release_quarantined(self, block_ids: list[int]) -> None:
        """Return quarantined blocks to the free pool (others in ``block_ids`` are ignored)."""
        for bid in sorted(set(block_ids) & self.quarantined):
            self.quarantined.remove(bid)
            self.free_ids.append(bid)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of ``seq``'s blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        stored: list[int] = []
        parent = seq.block_hashes[-1] if seq.block_hashes else chain_root(seq)
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block_hash = hash_block(parent, tokens)
            seq.block_hashes.append(block_hash)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and block_hash not in self.hash_to_block:
                block.block_hash = block_hash
                block.token_ids = tokens
                block.parent_hash = parent
                self.hash_to_block[block_hash] = block.block_id
                stored.append(block_hash)
                if self.feed_tiers:
                    self._registered.append(CachedBlock(block.block_id, block_hash, tokens))
            # else: the same prefix (or a colliding one) is already cached in another block
            parent = block_hash
        if stored:
            self._events.append(KVEvent("stored", stored))

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block (used by tests and by a role switch)."""
        while self.evictable:
            bid, _ = self.evictable.popitem(last=False)
            self._forget(self.blocks[bid])
            self.free_ids.append(bid)

    def check_invariants(self) -> None:
        """Assert the allocator's bookkeeping is consistent (tests call this)."""
        free = set(self.free_ids)
        evict = set(self.evictable)
        assert len(free) == len(self.free_ids), "a block is listed twice as free"
        assert not free & evict
        assert not (free | evict) & self.quarantined
        for block in self.blocks:
            in_pool = block.block_id in free or block.block_id in evict
            if block.block_id in self.quarantined:
                in_pool = True
                assert block.block_hash is None, block
            assert (block.ref_count == 0) == in_pool, block
            if block.block_id in evict:
                assert block.block_hash is not None
            if block.block_id in free:
                assert block.block_hash is None, block
            assert (block.block_hash is None) == (block.parent_hash is None), block
            if block.block_hash is not None:
                assert self.hash_to_block.get(block.block_hash) == block.block_id, block
        for h, bid in self.hash_to_block.items():
            assert self.blocks[bid].block_hash == h
