"""The suffix proposer's memory budget (no model): a request's trie keeps a window of its
tokens, every trie of the worker together stays within its token budget whatever the stream
of outputs, a long prompt is indexed over several steps, and the tries' node counts are the
nodes they hold."""

from __future__ import annotations

import gc
import random

import pytest

from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Sequence
from services.engine.speculative.config import SpeculativeConfig
from services.engine.speculative.suffix import (
    FOLLOW_TOKENS,
    INDEX_TOKENS_PER_STEP,
    SuffixProposer,
    SuffixTrie,
    _RequestTrie,
    min_worker_bytes,
)
from services.engine.speculative.suffix_trie import NODE_BYTES

DEPTH = 6


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence(f"r{random.random()}", list(tokens), SamplingParams(max_tokens=1 << 20))


def dump(trie: SuffixTrie, node: int = 0) -> dict:
    """A trie as nested dicts of (count, children), to compare two tries."""
    kids = trie.kids[node] or {}
    return {t: (trie.counts[c], dump(trie, c)) for t, c in kids.items()}


def test_request_trie_is_its_last_window_of_tokens():
    """Token by token past the window: the trie equals one built from the window's tokens
    alone, and holds at most window x depth nodes (the old trie kept every token)."""
    rng = random.Random(0)
    tokens = [rng.randrange(5) for _ in range(400)]  # few symbols: shared and deleted paths
    window = 40
    trie = _RequestTrie(DEPTH)
    for n in range(1, len(tokens) + 1):
        trie.extend(tokens, n, window)
        assert trie.tokens == min(n, window)
        assert trie.trie.nodes == trie.trie.reachable() <= window * DEPTH
        if n % 37 == 0 or n == len(tokens):
            fresh = _RequestTrie(DEPTH, start=trie.start)
            fresh.extend(tokens, n, window)
            assert dump(fresh.trie) == dump(trie.trie)


def test_worker_trie_stays_in_budget_under_long_outputs():
    """A stream of outputs longer than the budget: the worker's trie holds at most the
    budget's tokens (counted in nodes too), the newest output's tail is proposed from."""
    rng = random.Random(1)
    prop = SuffixProposer(DEPTH, 256, 0.1, max_request_tokens=300, max_worker_tokens=1000)
    last: list[int] = []
    for _ in range(30):
        done = seq_of([1, 2, 3])
        last = [rng.randrange(49152) for _ in range(700)]
        for t in last:
            done.append_token(t)
        prop.finished(done)
        assert prop.tokens == prop.cached_tokens <= 1000
        assert prop.global_trie.nodes == prop.global_trie.reachable() <= 1000 * DEPTH
    # Each output is kept by its last max_request_tokens: the newest one's tail continues.
    assert prop.propose(seq_of([7, *last[-20:-10]]), 4) == last[-10:-6]
    assert prop.propose(seq_of([7, *last[10:20]]), 4) == []  # its head was not kept


def test_long_prompt_is_indexed_over_steps():
    """A 3,000-token prompt: each step indexes at most the step's budget, the window fills
    over steps, and the copy it holds is then proposed."""
    rng = random.Random(2)
    unit = [rng.randrange(49152) for _ in range(50)]
    prompt = [rng.randrange(49152) for _ in range(2950)] + unit
    prop = SuffixProposer(DEPTH, 0, 0.1, max_request_tokens=1000, max_worker_tokens=1000)
    seq = seq_of(prompt)
    steps = 0
    while True:
        prop.new_step()
        before = seq.draft_state.indexed if isinstance(seq.draft_state, _RequestTrie) else 0
        prop.propose(seq, 4)
        state = seq.draft_state
        assert isinstance(state, _RequestTrie)
        assert state.indexed - max(before, seq.num_tokens - 1000) <= INDEX_TOKENS_PER_STEP
        steps += 1
        if state.indexed == seq.num_tokens:
            break
    assert steps == -(-1000 // INDEX_TOKENS_PER_STEP)
    assert state.start == seq.num_tokens - 1000 and prop.tokens == 1000
    for t in unit[:5]:  # the copy starts: drafts continue the unit
        seq.append_token(t)
    prop.new_step()
    assert prop.propose(seq, 4) == unit[5:9]


def test_worker_tries_stay_in_their_byte_budget():
    """Random text (every substring new: ``max_depth`` nodes a token) where the token budget
    alone would let the tries hold 20,000 tokens (120,000 nodes, 31.8 MB): running requests'
    tries and finished outputs together stay within the bytes given (5,000 nodes), counted
    on the nodes the tries hold; the least recent request is emptied, the newest proposes
    from its own window. On the old code there was no byte budget."""
    rng = random.Random(5)
    budget = min_worker_bytes(DEPTH, 300) + 400 * DEPTH * NODE_BYTES
    prop = SuffixProposer(DEPTH, 64, 0.1, max_request_tokens=300, max_worker_tokens=20_000,
                          max_worker_bytes=budget)  # fmt: skip
    assert prop.max_worker_nodes == budget // NODE_BYTES < 20_000 * DEPTH
    seqs = []
    for i in range(12):
        seq = seq_of([rng.randrange(49152) for _ in range(300)])
        seqs.append(seq)
        while not isinstance(seq.draft_state, _RequestTrie) or (
            seq.draft_state.indexed < seq.num_tokens
        ):
            prop.new_step()
            prop.propose(seq, 4)
            held = prop.global_trie.reachable() + sum(
                s.draft_state.trie.reachable() for s in seqs if s.draft_state is not None
            )
            assert prop.nodes == held <= prop.max_worker_nodes
        if i % 3 == 2:
            prop.finished(seqs[i - 1])  # an output goes to the worker's trie
            assert prop.nodes <= prop.max_worker_nodes
    assert prop.evictions > 0 and seqs[-1].draft_state.tokens == 300
    unit = seqs[-1].token_ids[100:110]
    for t in unit[:5]:  # the newest request copies itself: proposed from its window
        seqs[-1].append_token(t)
    prop.new_step()
    assert prop.propose(seqs[-1], 4) == unit[5:9]


def test_follow_tokens_need_no_budget():
    """A caught-up sequence indexes its new tokens after the step's budget is spent."""
    prop = SuffixProposer(DEPTH, 0, 0.1, max_request_tokens=5000, max_worker_tokens=5000)
    long_seq = seq_of(list(range(1000, 4000)))
    short = seq_of([1, 2, 3, 4, 1, 2])
    prop.new_step()
    prop.propose(long_seq, 4)
    assert prop.propose(short, 2) == [3, 4]  # budget spent; FOLLOW_TOKENS cover it
    assert short.draft_state.indexed == short.num_tokens <= FOLLOW_TOKENS


def test_running_tries_are_evicted_least_recent_first_and_freed_with_their_sequence():
    prop = SuffixProposer(DEPTH, 4, 0.1, max_request_tokens=100, max_worker_tokens=250)
    seqs = [seq_of([i * 1000 + j for j in range(100)]) for i in range(3)]
    for i in range(3):
        prop.new_step()
        prop.propose(seqs[i], 2)
    # The third needed room: the first (least recent) was emptied, the second kept.
    assert [s.draft_state.tokens for s in seqs] == [0, 100, 100]
    assert prop.tokens == prop.request_tokens == 200
    assert seqs[0].draft_state.trie.nodes == 0
    prop.finished(seqs[1])  # its trie goes at once; its output (none) is not kept
    assert prop.tokens == 100
    del seqs[2]  # an aborted sequence is dropped by the engine: its trie goes with it
    gc.collect()
    assert prop.tokens == 0 and len(prop._tries) == 1


def test_outputs_take_only_the_room_running_requests_leave():
    prop = SuffixProposer(DEPTH, 8, 0.1, max_request_tokens=100, max_worker_tokens=150)
    running = seq_of(list(range(100)))
    prop.propose(running, 2)
    done = seq_of([1])
    for t in range(500, 580):
        done.append_token(t)
    prop.finished(done)
    assert prop.cached_tokens == 50 and prop.recent[0] == list(range(530, 580))
    assert prop.global_trie.nodes == prop.global_trie.reachable()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"suffix_max_request_tokens": 4}, "suffix_max_depth <= suffix_max_request_tokens"),
        ({"suffix_max_request_tokens": 5000, "suffix_max_worker_tokens": 4096}, "<= suffix_max"),
        ({"suffix_max_worker_bytes": 3 << 30}, "suffix_max_worker_bytes must be in"),
        ({"suffix_max_worker_tokens": 1e5}, "suffix_max_worker_tokens must be int"),
        ({"suffix_max_depth": 64, "suffix_max_worker_bytes": 64 << 20}, "one request's trie"),
    ],
)
def test_budget_over_the_limits_is_refused(data, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse({"method": "suffix", **data})


def test_removing_an_output_restores_the_trie():
    """``add`` then ``add(sign=-1)`` of outputs in any order leaves the others' counts."""
    rng = random.Random(3)
    outs = [[rng.randrange(4) for _ in range(30)] for _ in range(5)]
    trie, ref = SuffixTrie(DEPTH), SuffixTrie(DEPTH)
    for o in outs:
        trie.add(o)
    for o in outs[2:]:
        ref.add(o)
    trie.add(outs[1], sign=-1)
    trie.add(outs[0], sign=-1)
    assert dump(trie) == dump(ref) and trie.nodes == ref.nodes == ref.reachable()


def test_trie_nodes_are_not_objects_the_garbage_collector_walks():
    """A 2,000-token trie (~50,000 nodes at depth 24) adds a handful of GC-tracked objects:
    with an object per node (the old trie), each full collection walked every node (~100 ms
    of a step for one long prompt's trie)."""
    rng = random.Random(4)
    tokens = [rng.randrange(49152) for _ in range(2000)]
    gc.collect()
    before = len(gc.get_objects())
    trie = _RequestTrie(24)
    trie.extend(tokens, len(tokens), 4096)
    assert trie.trie.nodes > 40_000
    assert len(gc.get_objects()) - before < 100


def test_a_trie_dying_while_room_is_made_does_not_break_the_scan():
    """A trie's weakref callback can run in the middle of ``_make_room``'s scan of the live
    tries (the cyclic GC collecting a finished request at any allocation): the scan must not
    fail (on the old code: 'dictionary changed size during iteration', raised in the step
    thread, which ends the worker)."""
    prop = SuffixProposer(DEPTH, 0, 0.1, max_request_tokens=100, max_worker_tokens=250)
    seqs = [seq_of([i * 1000 + j for j in range(100)]) for i in range(4)]
    for s in seqs[:3]:
        prop.new_step()
        prop.propose(s, 2)
    assert [s.draft_state.tokens for s in seqs[:3]] == [0, 100, 100]  # the first emptied
    # The scan reads the emptied first trie (no victim), the second dies under it.
    dying = seqs[1].draft_state.serial

    class Held(dict):
        """``_held`` whose first read during the scan lets a trie die, as a GC pass would."""

        fired = False

        def _die(self) -> None:
            if not Held.fired and dying in self:
                Held.fired = True
                prop._forget(dying)

        def __getitem__(self, key):
            self._die()
            return super().__getitem__(key)

        def get(self, key, default=None):
            self._die()
            return super().get(key, default)

    prop._held = Held(prop._held)
    prop.new_step()
    prop.propose(seqs[3], 2)  # needs room: scans the live tries
    assert Held.fired
    assert seqs[3].draft_state.tokens == 100 and prop.tokens <= 250
