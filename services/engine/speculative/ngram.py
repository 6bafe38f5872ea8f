"""Prompt lookup (vLLM's ``ngram`` method): propose what followed the latest earlier match of
the context's last tokens, in the prompt or the output so far."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.engine.sequence import Sequence

# Earlier occurrences of the shortest tail compared per proposal (the most recent ones): a
# token run repeated thousands of times would otherwise make every step scan them all.
MAX_CANDIDATES = 32


class NgramIndex:
    """Where each ``n``-gram of one sequence's tokens ended, built incrementally (a step
    indexes only the tokens appended since the last)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.indexed = 0  # grams ending at positions <= this are in ``ends``
        self.ends: dict[tuple[int, ...], list[int]] = {}

    def update(self, tokens: list[int], upto: int) -> None:
        """Index the grams ending at positions ``(indexed, upto]``."""
        n = self.n
        for end in range(max(self.indexed + 1, n), upto + 1):
            self.ends.setdefault(tuple(tokens[end - n : end]), []).append(end)
        self.indexed = max(self.indexed, upto)


class NgramProposer:
    """Finds the longest tail (``prompt_lookup_max`` down to ``prompt_lookup_min`` tokens) of a
    sequence that occurred earlier in it, and proposes the tokens that followed it there."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, seq: Sequence, k: int) -> list[int]:
        tokens = seq.token_ids
        size = len(tokens)
        if size <= self.min_n:
            return []
        index = seq.draft_state
        if not isinstance(index, NgramIndex):
            index = seq.draft_state = NgramIndex(self.min_n)
        # An earlier occurrence ends before the tail does (it needs a token after it).
        index.update(tokens, size - 1)
        ends = index.ends.get(tuple(tokens[size - self.min_n :]))
        if not ends:
            return []
        best_end, best_len = -1, 0
        for end in reversed(ends[-MAX_CANDIDATES:]):
            m = self.min_n
            while m < self.max_n and end - m - 1 >= 0 and tokens[end - m - 1] == tokens[-m - 1]:
                m += 1
            if m > best_len:  # NOTE: strictly longer: among equals the latest wins
                best_end, best_len = end, m
                if m == self.max_n:
                    break
        return tokens[best_end : best_end + k]

    def finished(self, seq: Sequence) -> None:
        """Nothing is kept beyond the sequence itself."""
