"""BlockManager: reference counts, prefix caching, LRU eviction, KV events, accounting."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from services.engine import block_manager as bm_mod
from services.engine.block_hash import ROOT_HASH, hash_block, hash_prompt_blocks
from services.engine.block_manager import BlockManager, ComputedBlocks
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Sequence

BS = 4


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams())


def prefill(bm: BlockManager, seq: Sequence) -> ComputedBlocks:
    """Allocate ``seq``'s whole prompt the way the scheduler does (prefix-cache lookup first),
    mark it computed and register its full blocks. Returns the cache hit."""
    computed = bm.get_computed_blocks(seq)
    start = computed.num_blocks * bm.block_size
    assert bm.allocate_slots(seq, seq.num_tokens - start, computed)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return computed


def referenced(bm: BlockManager) -> int:
    return sum(1 for b in bm.blocks if b.ref_count > 0)


def state(bm: BlockManager) -> tuple:
    return (
        [(b.ref_count, b.block_hash, b.token_ids) for b in bm.blocks],
        list(bm.free_ids),
        list(bm.evictable),
        dict(bm.hash_to_block),
        [(e.kind, list(e.block_hashes)) for e in bm._events],
    )


# ---- hashing ---------------------------------------------------------------------------------


def test_hash_is_deterministic_and_chained() -> None:
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) == hash_block(ROOT_HASH, (1, 2, 3, 4))
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) != hash_block(ROOT_HASH, [1, 2, 3, 5])
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) != hash_block(ROOT_HASH + 1, [1, 2, 3, 4])
    h = hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert 0 <= h < 2**64
    # Pinned value: the router computes the same hashes, so the scheme must not drift silently.
    assert h == 10616203279754984133
    assert hash_prompt_blocks(list(range(10)), 4) == [
        hash_block(ROOT_HASH, [0, 1, 2, 3]),
        hash_block(hash_block(ROOT_HASH, [0, 1, 2, 3]), [4, 5, 6, 7]),
    ]
    assert hash_prompt_blocks([1, 2, 3], 4) == []
    assert len(hash_prompt_blocks(list(range(8)), 4)) == 2


# ---- construction / accounting -----------------------------------------------------------------


def test_rejects_empty_cache() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, BS)


def test_fresh_manager_accounting() -> None:
    bm = BlockManager(8, BS)
    assert bm.num_free_blocks == 8
    assert bm.usage == 0.0
    assert bm.hit_rate == 0.0
    assert bm.blocks_needed(0) == 0
    assert bm.blocks_needed(1) == 1
    assert bm.blocks_needed(4) == 1
    assert bm.blocks_needed(5) == 2
    assert bm.take_events() == []
    bm.check_invariants()


def test_allocate_grow_and_free_counts() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    seq = make_seq(list(range(6)))
    assert bm.allocate_slots(seq, 6)
    assert len(seq.block_table) == 2
    assert len(set(seq.block_table)) == 2
    assert bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(2 / 8)
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    seq.num_computed_tokens = 6
    # Two more tokens still fit in the second block.
    assert bm.allocate_slots(seq, 2)
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 8
    # The ninth token needs a third block.
    assert bm.allocate_slots(seq, 1)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 5
    bm.check_invariants()
    bm.free(seq)
    assert seq.block_table == [] and seq.block_hashes == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)
    bm.check_invariants()


def test_allocate_slots_is_all_or_nothing() -> None:
    bm = BlockManager(3, BS, enable_prefix_caching=False)
    a = make_seq(list(range(8)))
    assert bm.allocate_slots(a, 8)  # 2 blocks
    b = make_seq(list(range(100, 109)))  # needs 3 blocks, 1 free
    before = state(bm)
    assert not bm.allocate_slots(b, 9)
    assert b.block_table == []
    assert b.num_computed_tokens == 0
    assert state(bm) == before
    assert bm.num_free_blocks == 1
    # Exactly enough still succeeds.
    assert bm.allocate_slots(b, 4)
    assert bm.num_free_blocks == 0
    assert not bm.allocate_slots(b, 5)  # would need a second block
    assert len(b.block_table) == 1
    bm.check_invariants()


def test_allocate_slots_all_or_nothing_with_cache_hit() -> None:
    """A cache hit that is not accompanied by enough fresh blocks must not be taken either."""
    bm = BlockManager(4, BS)
    a = make_seq(list(range(9)))
    prefill(bm, a)  # 3 blocks, 2 full and registered
    bm.free(a)  # both full blocks evictable, the partial one free
    bm.take_events()
    b = make_seq(list(range(8)) + list(range(50, 58)))  # hit 2 blocks, needs 2 more
    computed = bm.get_computed_blocks(b)
    assert computed.num_blocks == 2
    filler = make_seq(list(range(200, 204)))
    assert bm.allocate_slots(filler, 4)  # takes the one plain free block
    before = state(bm)
    # 2 fresh blocks needed; free count says 3 but 2 of those are the hit itself.
    assert bm.num_free_blocks == 3
    assert not bm.allocate_slots(b, 8, computed)
    assert state(bm) == before
    assert b.block_table == [] and b.block_hashes == [] and b.num_computed_tokens == 0
    bm.check_invariants()
    bm.free(filler)
    assert bm.allocate_slots(b, 8, computed)
    assert b.block_table[:2] == computed.block_ids
    assert b.num_computed_tokens == 8
    bm.check_invariants()


# ---- ref counts and sharing ----------------------------------------------------------------------


def test_prefix_hit_shares_blocks_and_counts_refs() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = make_seq(prompt)
    assert prefill(bm, a).num_blocks == 0
    assert a.block_hashes == hash_prompt_blocks(prompt, BS)
    b = make_seq(prompt + [99])
    hit = prefill(bm, b)
    assert hit.num_blocks == 2
    assert hit.block_ids == a.block_table[:2]
    assert hit.block_hashes == a.block_hashes
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    for bid in a.block_table[:2]:
        assert bm.blocks[bid].ref_count == 2
    assert bm.blocks[a.block_table[2]].ref_count == 1
    assert bm.num_free_blocks == 16 - 4
    bm.check_invariants()
    bm.free(a)
    for bid in b.block_table:
        assert bm.blocks[bid].ref_count == 1
    assert bm.num_free_blocks == 16 - 3
    bm.free(b)
    assert bm.num_free_blocks == 16
    assert all(blk.ref_count == 0 for blk in bm.blocks)
    bm.check_invariants()


def test_allocate_sets_num_computed_to_cached_tokens() -> None:
    bm = BlockManager(16, BS)
    prefill(bm, make_seq(list(range(12))))
    b = make_seq(list(range(12)) + [7])
    computed = bm.get_computed_blocks(b)
    assert computed.num_blocks == 3
    assert bm.allocate_slots(b, 1, computed)
    assert b.num_computed_tokens == 12
    assert len(b.block_table) == 4
    assert b.block_hashes == hash_prompt_blocks(b.token_ids, BS)


def test_lookup_leaves_at_least_one_token_to_compute() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(8))
    prefill(bm, make_seq(prompt))
    # The same 8 tokens again: only the first block may be reused (the last token must be
    # computed to sample from it).
    assert bm.get_computed_blocks(make_seq(prompt)).num_blocks == 1
    assert bm.get_computed_blocks(make_seq(prompt + [1])).num_blocks == 2
    assert bm.get_computed_blocks(make_seq(prompt[:4])).num_blocks == 0
    assert bm.get_computed_blocks(make_seq(prompt[:5])).num_blocks == 1


def test_lookup_skipped_with_caching_disabled_or_existing_blocks() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    prefill(bm, make_seq(list(range(12))))
    assert bm.hash_to_block == {}
    assert bm.take_events() == []
    assert bm.get_computed_blocks(make_seq(list(range(13)))).num_blocks == 0

    bm = BlockManager(16, BS)
    prefill(bm, make_seq(list(range(12))))
    s = make_seq(list(range(13)))
    assert bm.allocate_slots(s, 1)  # already has a block table
    assert bm.get_computed_blocks(s).num_blocks == 0


def test_prefix_hit_stops_at_first_differing_block() -> None:
    bm = BlockManager(16, BS)
    prefill(bm, make_seq(list(range(16))))
    tokens = list(range(8)) + [0, 0, 0, 0] + list(range(12, 17))
    hit = bm.get_computed_blocks(make_seq(tokens))
    assert hit.num_blocks == 2


def test_same_block_after_different_prefix_does_not_hit() -> None:
    bm = BlockManager(16, BS)
    prefill(bm, make_seq([1, 1, 1, 1, 5, 6, 7, 8, 0]))
    # Block 2 content [5, 6, 7, 8] is identical, but its prefix differs: no hit at all.
    seq = make_seq([2, 2, 2, 2, 5, 6, 7, 8, 0])
    assert bm.get_computed_blocks(seq).num_blocks == 0
    # And it is not even found when looked up as the first block.
    assert bm.get_computed_blocks(make_seq([5, 6, 7, 8, 0])).num_blocks == 0
    prefill(bm, seq)
    # Both copies registered under different chained hashes.
    assert len(bm.hash_to_block) == 4


def test_hash_collision_is_caught_by_token_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every block hashes to the same value: only the token comparison can tell them apart.
    monkeypatch.setattr(bm_mod, "hash_block", lambda parent, tokens: 42)
    bm = BlockManager(16, BS)
    a = make_seq([1, 2, 3, 4, 9])
    prefill(bm, a)
    assert bm.hash_to_block == {42: a.block_table[0]}
    b = make_seq([5, 6, 7, 8, 9])
    assert bm.get_computed_blocks(b).num_blocks == 0
    prefill(bm, b)
    assert b.block_table[0] != a.block_table[0]
    assert bm.blocks[b.block_table[0]].ref_count == 1
    # The colliding block was not registered over the first one.
    assert bm.hash_to_block == {42: a.block_table[0]}
    assert bm.blocks[a.block_table[0]].token_ids == (1, 2, 3, 4)
    # A true hit is still found.
    c = make_seq([1, 2, 3, 4, 0])
    assert bm.get_computed_blocks(c).block_ids == [a.block_table[0]]
    bm.check_invariants()


def test_hash_collision_with_a_different_parent_is_no_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hash ignores the parent: a block of the same tokens at another position (after
    # another prefix) collides with it. Only comparing the parent hash tells them apart.
    monkeypatch.setattr(bm_mod, "hash_block", lambda parent, tokens: hash(tuple(tokens)))
    bm = BlockManager(16, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    prefill(bm, a)
    # [5, 6, 7, 8] as the first block: same tokens and hash as a's second block, but its
    # KV was computed after [1, 2, 3, 4] at positions 4..7.
    b = make_seq([5, 6, 7, 8, 9])
    assert bm.get_computed_blocks(b).num_blocks == 0
    # The same tokens after a different first block: no hit either.
    c = make_seq([0, 0, 0, 0, 5, 6, 7, 8, 9])
    assert bm.get_computed_blocks(c).num_blocks == 0
    # The true prefix still hits both blocks.
    d = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert bm.get_computed_blocks(d).block_ids == a.block_table[:2]
    prefill(bm, b)
    assert bm.blocks[b.block_table[0]].ref_count == 1
    assert bm.get_computed_blocks(make_seq([5, 6, 7, 8, 0])).num_blocks == 0
    bm.check_invariants()


def test_duplicate_content_registered_once() -> None:
    bm = BlockManager(16, BS)
    a = make_seq(list(range(9)))
    b = make_seq(list(range(9)))
    # Both allocate before either is computed: no hit, two copies.
    assert bm.allocate_slots(a, 9)
    assert bm.allocate_slots(b, 9)
    a.num_computed_tokens = b.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    bm.cache_full_blocks(b)
    assert b.block_hashes == a.block_hashes  # the hashes are recorded for both
    assert [bm.hash_to_block[h] for h in a.block_hashes] == a.block_table[:2]
    assert all(bm.blocks[x].block_hash is None for x in b.block_table)
    events = bm.take_events()
    assert [(e.kind, e.block_hashes) for e in events] == [("stored", a.block_hashes)]
    bm.free(b)  # unregistered blocks go straight back to the free list
    assert len(bm.evictable) == 0
    a_table = list(a.block_table)
    bm.free(a)
    assert list(bm.evictable) == [a_table[1], a_table[0]]
    bm.check_invariants()


def test_cache_full_blocks_only_registers_computed_full_blocks() -> None:
    bm = BlockManager(16, BS)
    seq = make_seq(list(range(11)))
    assert bm.allocate_slots(seq, 11)
    seq.num_computed_tokens = 3
    bm.cache_full_blocks(seq)
    assert seq.block_hashes == [] and bm.hash_to_block == {}
    seq.num_computed_tokens = 7
    bm.cache_full_blocks(seq)
    assert len(seq.block_hashes) == 1
    seq.num_computed_tokens = 11
    bm.cache_full_blocks(seq)
    assert seq.block_hashes == hash_prompt_blocks(seq.token_ids, BS)
    for i, h in enumerate(seq.block_hashes):
        blk = bm.blocks[seq.block_table[i]]
        assert blk.block_hash == h
        assert blk.token_ids == tuple(seq.token_ids[i * BS : (i + 1) * BS])
    assert bm.blocks[seq.block_table[2]].block_hash is None
    # Decode grows the sequence; its third block becomes full later.
    seq.append_token(11)
    assert bm.allocate_slots(seq, 1)
    seq.num_computed_tokens = 12
    bm.cache_full_blocks(seq)
    assert seq.block_hashes == hash_prompt_blocks(seq.token_ids, BS)
    assert len(seq.block_hashes) == 3
    events = bm.take_events()
    assert [e.kind for e in events] == ["stored", "stored", "stored"]
    assert sum((e.block_hashes for e in events), []) == seq.block_hashes
    bm.check_invariants()


# ---- eviction ---------------------------------------------------------------------------------


def test_freed_cached_blocks_stay_resident_and_count_as_free() -> None:
    bm = BlockManager(8, BS)
    a = make_seq(list(range(9)))
    prefill(bm, a)
    a_table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8
    assert len(bm.evictable) == 2
    assert len(bm.hash_to_block) == 2
    b = make_seq(list(range(9)))
    hit = prefill(bm, b)
    assert hit.block_ids == a_table[:2]
    assert len(bm.evictable) == 0
    bm.check_invariants()


def test_lru_eviction_order() -> None:
    bm = BlockManager(6, BS)
    a = make_seq([1] * 4 + [2] * 4 + [0])  # 2 cached blocks + 1
    b = make_seq([3] * 4 + [4] * 4 + [0])
    prefill(bm, a)
    prefill(bm, b)
    a_blocks, b_blocks = a.block_table[:2], b.block_table[:2]
    a_hashes, b_hashes = list(a.block_hashes), list(b.block_hashes)
    bm.free(a)  # a's blocks released first: least recently used
    bm.free(b)
    # Tail blocks are released (and so evicted) before the head of the same prefix.
    assert list(bm.evictable) == [a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]
    assert len(bm.free_ids) == 2
    bm.take_events()

    # Touch a's first block again (a hit), then release it: it becomes the most recent.
    c = make_seq([1] * 4 + [9])
    assert prefill(bm, c).block_ids == [a_blocks[0]]
    bm.free(c)
    bm.take_events()
    assert list(bm.evictable)[-1] == a_blocks[0]

    # Needing 4 blocks: the 2 plain free ones first, then evict a_blocks[1], b_blocks[1].
    d = make_seq(list(range(100, 116)))
    plain = set(bm.free_ids)
    assert bm.allocate_slots(d, 16)
    assert set(d.block_table) == plain | {a_blocks[1], b_blocks[1]}
    assert d.block_table == sorted(d.block_table)  # ascending, so that a PD push coalesces
    assert list(bm.evictable) == [b_blocks[0], a_blocks[0]]
    events = bm.take_events()
    removed = [h for e in events if e.kind == "removed" for h in e.block_hashes]
    assert removed == [a_hashes[1], b_hashes[1]]
    assert all(e.kind == "removed" for e in events)
    assert a_hashes[1] not in bm.hash_to_block
    assert b_hashes[1] not in bm.hash_to_block
    assert bm.blocks[a_blocks[1]].block_hash is None
    assert bm.blocks[a_blocks[1]].token_ids == ()
    # The survivors are still hits; an evicted second block cuts the hit short.
    assert bm.get_computed_blocks(make_seq([1] * 4 + [2] * 4 + [0])).num_blocks == 1
    assert bm.get_computed_blocks(make_seq([3] * 4 + [4] * 4 + [0])).num_blocks == 1
    bm.check_invariants()


def test_plain_free_blocks_are_used_before_evicting() -> None:
    bm = BlockManager(4, BS)
    a = make_seq(list(range(5)))
    prefill(bm, a)  # one registered block, one partial
    bm.free(a)
    assert len(bm.evictable) == 1
    b = make_seq(list(range(50, 62)))
    assert bm.allocate_slots(b, 12)  # exactly the 3 plain free blocks
    assert len(bm.evictable) == 1
    assert bm.take_events() == [bm_mod.KVEvent("stored", hash_prompt_blocks(a.token_ids, BS))]
    bm.check_invariants()


def test_reset_prefix_cache() -> None:
    bm = BlockManager(8, BS)
    a = make_seq(list(range(9)))
    b = make_seq(list(range(20, 29)))
    prefill(bm, a)
    prefill(bm, b)
    bm.free(a)
    bm.take_events()
    bm.reset_prefix_cache()
    # Only the unreferenced blocks are forgotten; b's stay registered.
    assert set(bm.hash_to_block) == set(b.block_hashes)
    assert len(bm.evictable) == 0
    events = bm.take_events()
    assert all(e.kind == "removed" for e in events)
    assert sorted(h for e in events for h in e.block_hashes) == sorted(
        hash_prompt_blocks(a.token_ids, BS)
    )
    assert bm.num_free_blocks == 8 - 3
    bm.check_invariants()


# ---- statistics --------------------------------------------------------------------------------


def test_note_lookup_hit_rate() -> None:
    bm = BlockManager(8, BS)
    s = make_seq(list(range(10)))
    bm.note_lookup(s, 4)
    assert s.num_cached_tokens == 4
    assert bm.hit_rate == pytest.approx(0.4)
    bm.note_lookup(make_seq(list(range(10))), 0)
    assert bm.hit_rate == pytest.approx(0.2)


# ---- check_invariants catches corruption ---------------------------------------------------------


def test_check_invariants_detects_corruption() -> None:
    bm = BlockManager(4, BS)
    a = make_seq(list(range(5)))
    prefill(bm, a)
    bm.check_invariants()

    broken = copy.deepcopy(bm)
    broken.blocks[a.block_table[0]].ref_count = 0  # referenced count lost
    with pytest.raises(AssertionError):
        broken.check_invariants()

    broken = copy.deepcopy(bm)
    broken.free_ids.append(a.block_table[1])  # in use and free
    with pytest.raises(AssertionError):
        broken.check_invariants()

    broken = copy.deepcopy(bm)
    broken.hash_to_block[123] = a.block_table[1]  # index points at a block with another hash
    with pytest.raises(AssertionError):
        broken.check_invariants()

    broken = copy.deepcopy(bm)
    broken.free_ids.append(broken.free_ids[0])  # a block listed twice as free
    with pytest.raises(AssertionError):
        broken.check_invariants()


# ---- property-based: random operation sequences ------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / grow / compute / free sequences against a small cache and a small
    alphabet (so prefixes repeat and hit). A fake KV store records, for each slot, the token
    prefix whose KV it holds; a sequence must always read back its own prefix."""

    seqs = Bundle("seqs")

    @initialize(
        num_blocks=st.integers(1, 12),
        block_size=st.sampled_from([1, 2, 4]),
        caching=st.booleans(),
    )
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.live: list[Sequence] = []
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}
        self.advertised: set[int] = set()

    # -- helpers --

    def _apply_events(self) -> None:
        for ev in self.bm.take_events():
            for h in ev.block_hashes:
                if ev.kind == "stored":
                    assert h not in self.advertised
                    self.advertised.add(h)
                else:
                    assert ev.kind == "removed"
                    assert h in self.advertised
                    self.advertised.remove(h)

    def _compute(self, seq: Sequence, n: int) -> None:
        """Write KV for tokens [computed, computed + n) and register full blocks."""
        bs = self.bm.block_size
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            bid = seq.block_table[pos // bs]
            # Only a block this sequence owns alone may be written.
            assert self.bm.blocks[bid].ref_count == 1
            assert self.bm.blocks[bid].block_hash is None
            self.kv[(bid, pos % bs)] = tuple(seq.token_ids[: pos + 1])
        seq.num_computed_tokens += n
        self.bm.cache_full_blocks(seq)

    def _try_allocate(self, seq: Sequence, n: int, computed: ComputedBlocks | None) -> bool:
        before = state(self.bm)
        seq_before = (list(seq.block_table), list(seq.block_hashes), seq.num_computed_tokens)
        free_before = self.bm.num_free_blocks
        ok = self.bm.allocate_slots(seq, n, computed)
        if not ok:
            assert state(self.bm) == before
            assert (seq.block_table, seq.block_hashes, seq.num_computed_tokens) == seq_before
        else:
            bs = self.bm.block_size
            assert len(seq.block_table) * bs >= seq.num_computed_tokens + n
            assert len(seq.block_table) == self.bm.blocks_needed(seq.num_computed_tokens + n)
            assert self.bm.num_free_blocks <= free_before
        return ok

    # -- rules --

    @rule(
        target=seqs,
        tokens=st.lists(st.integers(0, 2), min_size=1, max_size=14),
        frac=st.floats(0.0, 1.0),
    )
    def add_sequence(self, tokens: list[int], frac: float):
        seq = make_seq(tokens)
        computed = self.bm.get_computed_blocks(seq)
        bs = self.bm.block_size
        assert computed.num_blocks * bs < seq.num_tokens
        for i, bid in enumerate(computed.block_ids):
            assert self.bm.blocks[bid].token_ids == tuple(tokens[i * bs : (i + 1) * bs])
        start = computed.num_blocks * bs
        n = max(1, round(frac * (seq.num_tokens - start)))
        if not self._try_allocate(seq, n, computed):
            return seq  # never started: nothing held (free() on it is a no-op)
        assert seq.num_computed_tokens == start
        self._compute(seq, n)
        self.live.append(seq)
        return seq

    @rule(seq=seqs, frac=st.floats(0.0, 1.0))
    def continue_prefill(self, seq: Sequence, frac: float) -> None:
        if seq not in self.live or seq.num_uncomputed_tokens == 0:
            return
        n = max(1, round(frac * seq.num_uncomputed_tokens))
        if self._try_allocate(seq, n, None):
            self._compute(seq, n)

    @rule(seq=seqs, tokens=st.lists(st.integers(0, 2), min_size=1, max_size=5))
    def grow(self, seq: Sequence, tokens: list[int]) -> None:
        """Decode: append tokens once everything so far is computed, then compute them."""
        if seq not in self.live or seq.num_uncomputed_tokens != 0:
            return
        for t in tokens:
            seq.append_token(t)
        if self._try_allocate(seq, len(tokens), None):
            self._compute(seq, len(tokens))

    @rule(seq=consumes(seqs))
    def free(self, seq: Sequence) -> None:
        if seq in self.live:
            self.live.remove(seq)
            self.bm.free(seq)
        assert seq.block_table == []

    @precondition(lambda self: hasattr(self, "bm"))
    @rule()
    def reset_cache(self) -> None:
        self.bm.reset_prefix_cache()
        assert not self.bm.evictable

    # -- invariants --

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "bm"):
            return
        bm = self.bm
        bm.check_invariants()
        self._apply_events()
        # Events describe exactly what is in the index.
        assert self.advertised == set(bm.hash_to_block)
        # Reference counts equal the number of live sequences holding each block; a sequence
        # never holds a block twice.
        owners = [0] * bm.num_blocks
        for seq in self.live:
            assert len(set(seq.block_table)) == len(seq.block_table)
            for bid in seq.block_table:
                owners[bid] += 1
        assert owners == [b.ref_count for b in bm.blocks]
        # Free + referenced = total.
        assert bm.num_free_blocks + sum(1 for o in owners if o) == bm.num_blocks
        assert len(bm.free_ids) + len(bm.evictable) == bm.num_free_blocks
        # The index maps every hash to a block whose tokens produce that hash.
        for h, bid in bm.hash_to_block.items():
            blk = bm.blocks[bid]
            assert blk.block_hash == h
            assert len(blk.token_ids) == bm.block_size
        for seq in self.live:
            bs = bm.block_size
            assert len(seq.block_table) * bs >= seq.num_computed_tokens
            assert (
                seq.block_hashes == hash_prompt_blocks(seq.token_ids, bs)[: len(seq.block_hashes)]
            )
            assert len(seq.block_hashes) == (
                seq.num_computed_tokens // bs if bm.enable_prefix_caching else 0
            )
            for i, h in enumerate(seq.block_hashes):
                blk = bm.blocks[seq.block_table[i]]
                assert blk.block_hash in (None, h)
            # The KV this sequence reads back is the KV of its own prefix.
            for pos in range(seq.num_computed_tokens):
                got = self.kv.get((seq.block_table[pos // bs], pos % bs))
                assert got == tuple(seq.token_ids[: pos + 1]), (seq, pos)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for seq in list(self.live):
            self.bm.free(seq)
        self.live.clear()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)
        self.bm.check_invariants()
        self.bm.reset_prefix_cache()
        assert sorted(self.bm.free_ids) == list(range(self.bm.num_blocks))
        assert self.bm.hash_to_block == {}
        self._apply_events()
        assert self.advertised == set()


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
