"""``SuffixTrie``: occurrence counts of every substring of at most ``max_depth`` tokens of a
text (suffix decoding's index, suffix.py), stored as parallel lists of ints."""

from __future__ import annotations

# Bytes of one node (tracemalloc over a 4,000-token random text's trie at depth 24: 25.3 MB
# for 95,576 nodes; mostly the dict of children of each inner node); the suffix proposer's
# byte budget counts nodes at this.
NODE_BYTES = 265
ROOT = 0


class SuffixTrie:
    """Occurrence counts of every substring of at most ``max_depth`` tokens.

    A node is an int: ``kids[node]`` maps a token to its child (None: no children) and
    ``counts[node]`` is its count. NOTE: no Python object per node that the cyclic garbage
    collector tracks (a dict holding only ints is never tracked): with an object and a dict
    per node, each of the collector's full passes walked every node, ~100 ms of a step for
    the ~100,000 nodes of one 4,000-token window (benchmarks/suffix_budget.py)."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.kids: list[dict[int, int] | None] = [None]
        self.counts: list[int] = [0]
        self.free: list[int] = []  # ids of deleted nodes, reused first
        self.nodes = 0  # below the root: what the trie's memory is counted in

    def new_node(self) -> int:
        self.nodes += 1
        if self.free:
            return self.free.pop()  # NOTE: freed with no children and a count of 0
        self.kids.append(None)
        self.counts.append(0)
        return len(self.counts) - 1

    def add(self, tokens: list[int], sign: int = 1) -> None:
        """Count (``sign`` 1) or uncount (-1, an earlier ``add`` of the same tokens) every
        substring of ``tokens``."""
        kids, counts = self.kids, self.counts
        for i in range(len(tokens)):
            if sign < 0:
                self.remove(tokens[i : i + self.max_depth])
                continue
            node = ROOT
            for t in tokens[i : i + self.max_depth]:
                k = kids[node]
                if k is None:
                    k = kids[node] = {}
                child = k.get(t)
                if child is None:
                    child = k[t] = self.new_node()
                counts[child] += 1
                node = child

    def remove(self, path: list[int]) -> None:
        """Uncount one occurrence of each prefix of ``path`` (counted before); a node counted
        no more goes with what is under it (NOTE: a substring occurs at most as often as its
        prefix: what is under it is counted no more either)."""
        kids, counts = self.kids, self.counts
        node = ROOT
        for t in path:
            k = kids[node]
            assert k is not None
            child = k[t]
            counts[child] -= 1
            if counts[child] <= 0:
                del k[t]
                if not k:
                    kids[node] = None
                self._free(child)
                return
            node = child

    def _free(self, top: int) -> None:
        kids, counts, stack = self.kids, self.counts, [top]
        while stack:
            node = stack.pop()
            k = kids[node]
            if k is not None:
                stack.extend(k.values())
                kids[node] = None
            counts[node] = 0
            self.free.append(node)
            self.nodes -= 1

    def reachable(self) -> int:
        """Nodes under the root, by walking them (``nodes`` counted independently)."""
        total, stack = 0, [ROOT]
        while stack:
            k = self.kids[stack.pop()]
            if k:
                total += len(k)
                stack.extend(k.values())
        return total

    def match(self, context: list[int], longest: int) -> tuple[int | None, int]:
        """The node of the longest tail of ``context`` (at most ``longest`` tokens) that occurs
        in the trie with a continuation, and that tail's length; (None, 0) when none does."""
        kids = self.kids
        for m in range(min(longest, len(context)), 0, -1):
            node: int | None = ROOT
            for t in context[len(context) - m :]:
                k = kids[node]  # type: ignore[index]
                node = k.get(t) if k else None
                if node is None:
                    break
            if node is not None and kids[node]:
                return node, m
        return None, 0

    def continuation(self, node: int, k: int, min_prob: float) -> list[int]:
        """Follow the most frequent child from ``node`` while the path's estimated
        probability (product of the children's shares) stays at least ``min_prob``."""
        kids, counts = self.kids, self.counts
        out: list[int] = []
        prob = 1.0
        while len(out) < k:
            children = kids[node]
            if not children:
                break
            token, child = max(children.items(), key=lambda kv: counts[kv[1]])
            prob *= counts[child] / max(counts[node], sum(counts[c] for c in children.values()))
            if prob < min_prob:
                break
            out.append(token)
            node = child
        return out
