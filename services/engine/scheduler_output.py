"""One step's schedule as the model runner and the KV tiers read it (data only, no logic).

The scheduler writes these; ``ModelRunner.execute`` turns ``ScheduledSeq`` items into
tensors and ``KVTierManager.before_step`` copies the ``loads`` into device blocks. Nothing
here imports the scheduler, the runner or torch, so each side depends on this module alone
(as vLLM v1's ``core/sched/output.py``).

NOTE (speculative decoding): the draft tokens of a decode travel on its ``ScheduledSeq``
(``draft_token_ids``, proposed before the step and verified by it), with ``num_new_tokens``
counting them too; the scheduler reserved their lookahead slots. They are not in
``seq.token_ids``: the runner computes ``seq``'s last token followed by them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.engine.sequence import Sequence


@dataclass(frozen=True)
class TierHit:
    """A prompt block found below the device."""

    block_hash: int
    token_ids: tuple[int, ...]
    tier: str  # "host" or "store"


@dataclass(frozen=True)
class KVLoad:
    """Fill device block ``block_id`` with the KV of ``hit`` before the step runs."""

    block_id: int
    seq_id: int  # the sequence the block was allocated to (owner of prefetched data)
    hit: TierHit


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on
    # Speculative tokens after the sequence's last (counted in num_new_tokens): the step
    # computes their KV and samples a token after each of them too.
    draft_token_ids: list[int] = field(default_factory=list)
    # The distributions the drafts were drawn from ([len(drafts), vocab] tensor), when a draft
    # model sampled them; None: the drafts are guesses (n-gram, suffix, a greedy draft) and a
    # draft is kept when the target's own draw equals it (speculative/acceptance.py).
    draft_probs: Any = None
    # The step reaches the sequence's last token, so it samples the next one. Fixed when
    # scheduled (postprocess advances num_computed_tokens afterwards).
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        known = self.num_new_tokens - len(self.draft_token_ids)  # tokens of seq.token_ids
        self.samples = self.seq.num_computed_tokens + known == self.seq.num_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens computed this step that are in ``seq.token_ids`` (all but the drafts)."""
        return self.num_new_tokens - len(self.draft_token_ids)

    @property
    def num_logit_rows(self) -> int:
        """Rows of logits the step returns for this sequence: one per verified position."""
        return 1 + len(self.draft_token_ids) if self.samples else 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Device blocks to fill from the host pool or the store before the model runs.
    loads: list[KVLoad] = field(default_factory=list)
    # Waiting sequences passed over because their blocks are still coming from the store.
    num_awaiting_store: int = 0
    # Set by ``Scheduler.resolve_stall`` when nothing runs: the queue's head waits for blocks
    # held outside the batch (a prefill's KV awaiting its push, decode reservations), which
    # come back without a step.
    blocked_on_memory: bool = False
    # ... and the sequences it ended ("abort"): they can never fit in the cache.
    aborted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens the batch computes (before ``postprocess`` advances the sequences)."""
        return sum(
            min(s.num_new_tokens, max(0, s.seq.num_prompt_tokens - s.seq.num_computed_tokens))
            for s in self.scheduled
        )
