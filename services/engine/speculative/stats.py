"""``SpecStats``: what speculation proposed and what was accepted (the worker's metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Counters since start-up (vLLM's spec-decode metrics)."""

    num_drafts: int = 0  # verifications: sequence-steps with at least one draft token
    num_draft_tokens: int = 0  # draft tokens verified
    num_accepted_tokens: int = 0  # of which accepted
    # Per draft position: how often a draft reached it, and how often it was accepted there.
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification appends on average: the accepted drafts plus the target's
        own token after them."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
