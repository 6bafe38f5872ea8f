"""Suffix decoding (as SGLang's / xLLM's ``suffix`` method, after Arctic's SuffixDecoding):
count tries over this request's tokens and over the recent outputs of this worker; match the
longest tail of the context in them and propose its most frequent continuation.

A trie node stands for a substring (the path to it) and counts its occurrences; every
substring of at most ``max_depth`` tokens is in it. The request's trie grows by one token per
appended token (each suffix ending there is extended: O(max_depth)); the worker's trie takes
a finished request's output at once and drops it again when it leaves the recent window.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.engine.sequence import Sequence


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0


class SuffixTrie:
    """Occurrence counts of every substring of at most ``max_depth`` tokens."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node()

    def add(self, tokens: list[int], sign: int = 1) -> None:
        """Count (``sign`` 1) or uncount (-1, an earlier ``add`` of the same tokens) every
        substring of ``tokens``."""
        for i in range(len(tokens)):
            node = self.root
            for t in tokens[i : i + self.max_depth]:
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = _Node()
                child.count += sign
                if child.count <= 0:
                    del node.children[t]
                    break
                node = child

    def match(self, context: list[int], longest: int) -> tuple[_Node | None, int]:
        """The node of the longest tail of ``context`` (at most ``longest`` tokens) that occurs
        in the trie with a continuation, and that tail's length; (None, 0) when none does."""
        for m in range(min(longest, len(context)), 0, -1):
            node: _Node | None = self.root
            for t in context[len(context) - m :]:
                node = node.children.get(t) if node is not None else None
                if node is None:
                    break
            if node is not None and node.children:
                return node, m
        return None, 0

    @staticmethod
    def continuation(node: _Node, k: int, min_prob: float) -> list[int]:
        """Follow the most frequent child from ``node`` while the path's estimated
        probability (product of the children's shares) stays at least ``min_prob``."""
        out: list[int] = []
        prob = 1.0
        while len(out) < k and node.children:
            token, child = max(node.children.items(), key=lambda kv: kv[1].count)
            prob *= child.count / max(node.count, sum(c.count for c in node.children.values()))
            if prob < min_prob:
                break
            out.append(token)
            node = child
        return out


class _RequestTrie:
    """A sequence's own trie, extended token by token (``Sequence.draft_state``)."""

    def __init__(self, max_depth: int) -> None:
        self.trie = SuffixTrie(max_depth)
        self.indexed = 0  # tokens of the sequence counted so far
        self.open: list[tuple[_Node, int]] = []  # nodes of the suffixes ending there, depths

    def extend(self, tokens: list[int]) -> None:
        depth_cap = self.trie.max_depth
        for t in tokens[self.indexed :]:
            grown: list[tuple[_Node, int]] = []
            for node, depth in [(self.trie.root, 0), *self.open]:
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = _Node()
                child.count += 1
                if depth + 1 < depth_cap:
                    grown.append((child, depth + 1))
            self.open = grown
        self.indexed = len(tokens)


class SuffixProposer:
    """Proposes from the request's trie or the worker's, whichever matches a longer tail."""

    def __init__(
        self,
        max_depth: int,
        max_cached_requests: int,
        min_token_prob: float,
        max_spec_factor: float = 2.0,
    ) -> None:
        self.max_depth = max_depth
        self.min_token_prob = min_token_prob
        self.max_spec_factor = max_spec_factor
        self.global_trie = SuffixTrie(max_depth)
        self.recent: deque[list[int]] = deque()
        self.max_cached_requests = max_cached_requests

    def propose(self, seq: Sequence, k: int) -> list[int]:
        state = seq.draft_state
        if not isinstance(state, _RequestTrie) or state.indexed > seq.num_tokens:
            state = seq.draft_state = _RequestTrie(self.max_depth)
        state.extend(seq.token_ids)
        tail = seq.token_ids[-(self.max_depth - 1) :]
        longest = max(1, self.max_depth - k)
        # The request's own trie holds the tail itself, at its end with no continuation yet:
        # a match there is an earlier occurrence.
        best, best_len = state.trie.match(tail, longest)
        node, m = self.global_trie.match(tail, longest)
        if node is not None and m > best_len:
            best, best_len = node, m
        if best is None:
            return []
        # A longer match is better evidence: a 1-token match proposes few drafts.
        k = min(k, max(1, int(self.max_spec_factor * best_len)))
        return SuffixTrie.continuation(best, k, self.min_token_prob)

    def finished(self, seq: Sequence) -> None:
        """Keep the output of a finished sequence for later requests (a window of the last
        ``max_cached_requests``)."""
        if not self.max_cached_requests or seq.num_output_tokens == 0:
            return
        out = seq.output_token_ids
        self.global_trie.add(out)
        self.recent.append(out)
        while len(self.recent) > self.max_cached_requests:
            self.global_trie.add(self.recent.popleft(), sign=-1)
