"""The scheduler's service-tier decisions (pure Python): each sequence's rank, the key the
queues are ordered by, the victim a preemption takes and the token budget offline work may
take in a step. The scheduler (scheduler.py) asks; it keeps the queues and the blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from services.engine.service_tiers import DEFAULT_OFFLINE_AGING_S, FLEX, SERVICE_TIERS, tier_rank

if TYPE_CHECKING:
    from services.engine.sequence import Sequence

OFFLINE_RANK = SERVICE_TIERS[FLEX]


class TierPolicy:
    def __init__(
        self,
        offline_aging_s: float = DEFAULT_OFFLINE_AGING_S,
        max_offline_batched_tokens: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.offline_aging_s = offline_aging_s
        self.max_offline_batched_tokens = max_offline_batched_tokens  # of a step; None: all
        self.clock = clock  # the time sequences' arrival_time is on (aging)

    def ranks(self, seqs: Iterable[Sequence]) -> dict[int, int]:
        """The rank of each of ``seqs`` (by seq_id) now: its tier's, a flex one aged."""
        now = self.clock()
        return {
            s.seq_id: tier_rank(s.params.service_tier, now - s.arrival_time, self.offline_aging_s)
            for s in seqs
        }

    def rank_on_arrival(self, seq: Sequence) -> int:
        """The rank of ``seq`` before it has waited at all."""
        return tier_rank(seq.params.service_tier, 0.0, self.offline_aging_s)

    @staticmethod
    def key(seq: Sequence, ranks: dict[int, int]) -> tuple[int, int]:
        """What running sequences are ordered by: (rank, integer priority), lower first."""
        return ranks[seq.seq_id], seq.params.priority

    def worst(
        self, seqs: list[Sequence], ranks: dict[int, int], worse_than: int | None = None
    ) -> Sequence | None:
        """The sequence of ``seqs`` to preempt first: the worst (rank, priority), the last
        among equals; only of a rank worse than ``worse_than`` if given."""
        candidates = [
            (i, s) for i, s in enumerate(seqs) if worse_than is None or ranks[s.seq_id] > worse_than
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda item: (*self.key(item[1], ranks), item[0]))[1]

    def budget(self, rank: int, budget: int) -> int:
        """What is left of a step's token ``budget`` for the sequences of ``rank``, which
        run after every better rank's (offline ones get at most their cap)."""
        if rank == OFFLINE_RANK and self.max_offline_batched_tokens is not None:
            return min(budget, self.max_offline_batched_tokens)
        return budget
