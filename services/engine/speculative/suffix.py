"""Suffix decoding (as SGLang's / xLLM's ``suffix`` method, after Arctic's SuffixDecoding):
count tries over this request's tokens and over the recent outputs of this worker; match the
longest tail of the context in them and propose its most frequent continuation.

A trie node stands for a substring (the path to it) and counts its occurrences; every
substring of at most ``max_depth`` tokens is in it. The request's trie grows by one token per
appended token (each suffix ending there is extended: O(max_depth)); the worker's trie takes
a finished request's output at once and drops it again when it leaves the recent window.

Memory (NOTE: the budget is the unbreakable rule's: no input can grow it without bound). A
token costs up to ``max_depth`` nodes of ~``NODE_BYTES`` each (random text: every substring
is new). So:
- a request's trie holds its last ``max_request_tokens`` tokens (a sliding window: the
  substrings starting at the token leaving it are uncounted as the next one comes);
- all the tries of the worker together (every request's and the recent outputs') hold at
  most ``max_worker_tokens`` tokens and at most ``max_worker_bytes`` of nodes (``nodes`` x
  ``NODE_BYTES``; a token's room is reserved for its worst case, ``max_depth`` nodes, before
  it is counted): to make room the oldest outputs go first, then the tries of the requests
  that proposed least recently (emptied: such a request's trie starts again from its newest
  tokens); a finished output is kept only in the room the running requests leave (its last
  tokens);
- a step indexes at most ``INDEX_TOKENS_PER_STEP`` tokens in all (``new_step``), beyond each
  sequence's ``FOLLOW_TOKENS``: a long prompt's trie is built over several steps (proposing
  from what is indexed so far) instead of stalling every stream in one (an 8,000-token prompt
  took 627 ms of CPU in one step at depth 24, 4.7 s of wall time on a loaded machine).
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from services.engine.speculative.suffix_trie import NODE_BYTES, ROOT, SuffixTrie

if TYPE_CHECKING:
    from services.engine.sequence import Sequence

# Tokens the request tries index per step, all sequences together, beyond FOLLOW_TOKENS each:
# ~10 us of CPU a token at depth 24, so a long prompt adds ~1.3 ms to each step it builds in.
INDEX_TOKENS_PER_STEP = 128
# What any sequence may always index in a step: one decode's growth (a token and at most 32
# accepted drafts), so a sequence that is caught up never falls behind for want of budget.
FOLLOW_TOKENS = 33


def min_worker_bytes(max_depth: int, max_request_tokens: int) -> int:
    """The smallest worker budget in bytes: one request's window and a step's indexing, at
    their worst (``max_depth`` nodes a token)."""
    return (max_request_tokens + INDEX_TOKENS_PER_STEP) * max_depth * NODE_BYTES


class _RequestTrie:
    """A sequence's own trie over a window of its tokens, ``[start, indexed)``, extended token
    by token (``Sequence.draft_state``)."""

    _serials = itertools.count()

    def __init__(self, max_depth: int, start: int = 0) -> None:
        self.trie = SuffixTrie(max_depth)
        self.serial = next(self._serials)  # its key in the proposer's registry
        self.start = start  # first token of the window
        self.indexed = start  # tokens of the sequence counted so far
        self.open: list[tuple[int, int]] = []  # nodes of the suffixes ending there, depths

    @property
    def tokens(self) -> int:
        return self.indexed - self.start

    def extend(self, tokens: list[int], upto: int, window: int) -> None:
        """Count the tokens up to ``upto``, keeping the last ``window`` (>= max_depth)."""
        trie, depth_cap = self.trie, self.trie.max_depth
        kids, counts = trie.kids, trie.counts
        for j in range(self.indexed, upto):
            t = tokens[j]
            grown: list[tuple[int, int]] = []
            for node, depth in [(ROOT, 0), *self.open]:
                k = kids[node]
                if k is None:
                    k = kids[node] = {}
                child = k.get(t)
                if child is None:
                    child = k[t] = trie.new_node()
                counts[child] += 1
                if depth + 1 < depth_cap:
                    grown.append((child, depth + 1))
            self.open = grown
            self.indexed = j + 1
            if self.indexed - self.start > window:
                # NOTE: the window is at least max_depth, so the substrings starting at
                # ``start`` are complete (none of them is an open suffix).
                trie.remove(tokens[self.start : self.start + depth_cap])
                self.start += 1

    def clear(self) -> None:
        """Forget everything; go on from the newest token indexed."""
        self.trie = SuffixTrie(self.trie.max_depth)
        self.start, self.open = self.indexed, []


class SuffixProposer:
    """Proposes from the request's trie or the worker's, whichever matches a longer tail."""

    def __init__(
        self,
        max_depth: int,
        max_cached_requests: int,
        min_token_prob: float,
        max_spec_factor: float = 2.0,
        max_request_tokens: int = 4096,
        max_worker_tokens: int = 32768,
        max_worker_bytes: int | None = None,
    ) -> None:
        if not max_depth <= max_request_tokens <= max_worker_tokens:
            raise ValueError("need max_depth <= max_request_tokens <= max_worker_tokens")
        # Nodes of every trie together (None: no limit but the tokens'). NOTE: at least one
        # request's worst case (its window and a step's indexing), so that the request being
        # extended always fits once the others are emptied.
        self.max_worker_nodes = sys.maxsize
        if max_worker_bytes is not None:
            self.max_worker_nodes = max_worker_bytes // NODE_BYTES
            if max_worker_bytes < min_worker_bytes(max_depth, max_request_tokens):
                raise ValueError("max_worker_bytes must hold one request's trie: at least "
                                 f"{min_worker_bytes(max_depth, max_request_tokens)}")  # fmt: skip
        self.max_depth = max_depth
        self.min_token_prob = min_token_prob
        self.max_spec_factor = max_spec_factor
        self.max_request_tokens = max_request_tokens
        self.max_worker_tokens = max_worker_tokens
        self.global_trie = SuffixTrie(max_depth)
        self.recent: deque[list[int]] = deque()
        self.max_cached_requests = max_cached_requests
        self.cached_tokens = 0  # in ``recent`` (and the global trie)
        # The live request tries, least recently proposing first, and the tokens each held
        # when last counted: a trie that dies with its sequence (finished, aborted) leaves
        # through the weak reference's callback.
        self._tries: OrderedDict[int, weakref.ref[_RequestTrie]] = OrderedDict()
        self._held: dict[int, int] = {}
        self.request_tokens = 0  # sum of ``_held``
        self._held_nodes: dict[int, int] = {}  # ... and the nodes each held
        self.request_nodes = 0  # sum of ``_held_nodes``
        self.evictions = 0  # running requests' tries emptied to make room
        self._step_left = INDEX_TOKENS_PER_STEP

    @property
    def tokens(self) -> int:
        """Tokens held by every trie of the worker (at most ``max_worker_tokens``)."""
        return self.cached_tokens + self.request_tokens

    @property
    def nodes(self) -> int:
        """Nodes of every trie of the worker (at most ``max_worker_nodes``)."""
        return self.global_trie.nodes + self.request_nodes

    def new_step(self) -> None:
        """A scheduler step begins: the indexing budget counts anew."""
        self._step_left = INDEX_TOKENS_PER_STEP

    def propose(self, seq: Sequence, k: int) -> list[int]:
        state = self._request_trie(seq)
        tokens, n = seq.token_ids, seq.num_tokens
        if state.indexed < n - self.max_request_tokens:
            state.clear()  # all it holds would leave the window: start at the window
            state.start = state.indexed = n - self.max_request_tokens
            self._count(state)
        upto = min(n, state.indexed + max(self._step_left, FOLLOW_TOKENS))
        grow = min(state.tokens + upto - state.indexed, self.max_request_tokens) - state.tokens
        # NOTE: each token indexed adds at most max_depth nodes (those of the token leaving
        # the window are uncounted after it), whatever its net growth in tokens.
        self._make_room(grow, state, (upto - state.indexed) * self.max_depth)
        self._step_left -= upto - state.indexed
        state.extend(tokens, upto, self.max_request_tokens)
        self._count(state)
        tail = tokens[-(self.max_depth - 1) :]
        longest = max(1, self.max_depth - k)
        # The request's own trie holds the tail itself, at its end with no continuation yet:
        # a match there is an earlier occurrence (while the trie is still being built it
        # ends earlier: a match is an earlier occurrence all the more).
        trie = state.trie
        best, best_len = trie.match(tail, longest)
        node, m = self.global_trie.match(tail, longest)
        if node is not None and m > best_len:
            trie, best, best_len = self.global_trie, node, m
        if best is None:
            return []
        # A longer match is better evidence: a 1-token match proposes few drafts.
        k = min(k, max(1, int(self.max_spec_factor * best_len)))
        return trie.continuation(best, k, self.min_token_prob)

    def finished(self, seq: Sequence) -> None:
        """Keep the output of a finished sequence for later requests (a window of the last
        ``max_cached_requests``, within the worker's token budget)."""
        state = seq.draft_state
        if isinstance(state, _RequestTrie):  # its memory goes now, not with the sequence
            seq.draft_state = None
            self._forget(state.serial)
        if not self.max_cached_requests or seq.num_output_tokens == 0:
            return
        out = seq.output_token_ids[-self.max_request_tokens :]
        depth = self.max_depth
        while self.recent and (
            len(self.recent) >= self.max_cached_requests
            or self.tokens + len(out) > self.max_worker_tokens
            or self.nodes + len(out) * depth > self.max_worker_nodes
        ):
            self._drop_oldest_output()
        # What the running requests leave, in tokens and in nodes (a token's worst case).
        room = min(self.max_worker_tokens - self.tokens,
                   (self.max_worker_nodes - self.nodes) // depth)  # fmt: skip
        out = out[len(out) - room :] if room < len(out) else out
        if len(out) < 2:
            return
        self.global_trie.add(out)
        self.recent.append(out)
        self.cached_tokens += len(out)

    def _request_trie(self, seq: Sequence) -> _RequestTrie:
        state = seq.draft_state
        if not isinstance(state, _RequestTrie) or state.indexed > seq.num_tokens:
            if isinstance(state, _RequestTrie):
                self._forget(state.serial)
            state = seq.draft_state = _RequestTrie(self.max_depth)
            self._tries[state.serial] = weakref.ref(state, self._died(state.serial))
            self._held[state.serial] = self._held_nodes[state.serial] = 0
        else:
            self._tries.move_to_end(state.serial)
        return state

    def _died(self, serial: int):  # noqa: ANN202 - a weakref callback
        proposer = weakref.ref(self)  # NOTE: the callback must not keep the proposer alive

        def callback(_ref: object) -> None:
            me = proposer()
            if me is not None:
                me._forget(serial)

        return callback

    def _forget(self, serial: int) -> None:
        self._tries.pop(serial, None)
        self.request_tokens -= self._held.pop(serial, 0)
        self.request_nodes -= self._held_nodes.pop(serial, 0)

    def _count(self, state: _RequestTrie) -> None:
        self.request_tokens += state.tokens - self._held[state.serial]
        self._held[state.serial] = state.tokens
        self.request_nodes += state.trie.nodes - self._held_nodes[state.serial]
        self._held_nodes[state.serial] = state.trie.nodes

    def _make_room(self, need: int, keep: _RequestTrie, need_nodes: int = 0) -> None:
        """Free tokens until ``need`` more (and ``need_nodes`` more nodes) fit in the
        worker's budgets: the oldest outputs first, then the least recently proposing
        requests' tries (never ``keep``'s)."""
        while (
            self.tokens + need > self.max_worker_tokens
            or self.nodes + need_nodes > self.max_worker_nodes
        ):
            if self.recent:
                self._drop_oldest_output()
                continue
            # NOTE: over a copy: a trie's weakref callback (_forget) may run during the scan
            # (the cyclic GC collecting a finished request) and change _tries.
            victim = next((s for s in list(self._tries) if s != keep.serial
                           and (self._held.get(s) or self._held_nodes.get(s))), None)  # fmt: skip
            if victim is None:
                # NOTE: cannot happen: keep alone holds at most max_request_tokens, and its
                # nodes with a step's indexing fit in max_worker_nodes (checked at start).
                return
            trie = self._tries[victim]()
            if trie is None:
                self._forget(victim)
                continue
            trie.clear()
            self._count(trie)
            self.evictions += 1

    def _drop_oldest_output(self) -> None:
        old = self.recent.popleft()
        self.global_trie.add(old, sign=-1)
        self.cached_tokens -= len(old)
