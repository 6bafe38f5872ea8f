"""Which sequences speculate in a step, how many tokens each, and what came of it.

Pure Python, held by the scheduler, which asks ``lookahead`` for the drafts of every decode
it schedules; after the step, ``accept`` counts the accepted drafts' KV and ``observe`` what
the verification accepted. NOTE: ``lookahead`` and ``accept`` are the scheduler's block
operations for draft tokens, kept here so that the scheduler stays one small module: they
allocate the drafts' slots (never by preempting: without room a decode runs without
drafts) and give back the slots of the rejected ones.

Adaptive length (NOTE: a heuristic, stated here because it decides speed, never output):
- a step with more running sequences than ``disable_by_batch_size`` speculates nowhere: there
  the batch already keeps the matmuls busy and ``1 + k`` query tokens per sequence multiply
  the step's cost while the accepted tokens do not;
- below that, a step verifies at most ``max_draft_tokens_per_step`` drafts in all: each of
  ``B`` running sequences drafts at most that over ``B`` (at least one while the step's
  drafts are under the cap: with more sequences than the cap, the first ones scheduled
  draft one each and the rest none);
- each sequence's next length follows its last verification: it doubles when every draft
  was accepted (a copy runs on: a 135M model on 2 cores verifies 17 tokens for ~1.5x a
  decode step), and after a rejection it is one more than the accepted run but at least half
  the length tried (one bad token inside a copied stretch does not end the stretch); it
  starts at ``num_speculative_tokens``, never passes it;
- each sequence also keeps exponential averages of the drafts it had accepted per
  verification and of how often a verification ended in a rejection (from priors of
  ``PRIOR_MEAN_ACCEPTED`` and ``PRIOR_MEAN_REJECTED``: two verifications accepting nothing
  stop a sequence that never had a draft accepted); their ratio estimates ``a``, the chance
  that a draft is accepted given that the ones before it were (accepted / (accepted +
  rejections)), so the ``j``-th draft adds a token with chance ``a ** j``. A draft token of
  each of ``B`` sequences adds about ``draft_cost(B)`` of a decode step to the step
  (``draft_token_cost``, or with ``measure_draft_cost`` measured on this worker's decode and
  verification steps, draft_cost.py), so
  a draft pays only while ``a ** j > draft_cost(B) * B``: the sequence drafts the longest
  run of such drafts (the marginal draft must pay, not the average: with the average, chat
  at batch 8 drafted two or three where the second already cost more than it gained, and
  ran at 0.87-0.92x the CPU per token of no speculation); when that allows none, or the
  average drops below ``MIN_MEAN_ACCEPTED``, it stops proposing, except for a one-token probe every
  ``PROBE_EVERY`` steps that lets a sequence entering a copy-heavy stretch start again; each
  time it stops again the probes come half as often (at most every ``MAX_PROBE_EVERY``
  steps), so that text whose probes hit but whose drafts do not (chat) costs next to nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from services.engine.speculative.config import SpeculativeConfig
from services.engine.speculative.draft_cost import DraftCostMeter
from services.engine.speculative.ngram import NgramProposer
from services.engine.speculative.stats import SpecStats
from services.engine.speculative.suffix import SuffixProposer

if TYPE_CHECKING:
    from services.engine.block_manager import BlockManager
    from services.engine.sequence import Sequence

# A deferred proposer's draft token before it is filled in (a valid id: never fed as is).
PLACEHOLDER = 0
EMA_WEIGHT = 0.5  # of the newest verification in a sequence's average
PRIOR_MEAN_ACCEPTED = 1.0  # a new sequence's average, before any verification
# ... and its average of rejections: a prior acceptance of 1 / 1.2 lets a new sequence
# draft the full 16 at batch 1 (0.833 ** 16 > 0.04), 6 at batch 8 (0.833 ** 6 > 0.32) and
# none at batch 24 (paying_drafts, draft_token_cost 0.04).
PRIOR_MEAN_REJECTED = 0.2
MIN_MEAN_ACCEPTED = 0.3
PROBE_EVERY = 8  # steps between one-token probes after a sequence first stops drafting
NO_LIMIT = 1 << 20  # drafts: as many as the other limits allow
MAX_PROBE_EVERY = 64  # the interval doubles each time it stops again, up to this


class Proposer(Protocol):
    """Guesses the tokens after ``seq``'s last; nothing it returns can change the output."""

    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to ``k`` tokens expected to follow ``seq.token_ids`` (none: no guess)."""
        ...

    def finished(self, seq: Sequence) -> None:
        """``seq`` ended (its output may feed later proposals)."""
        ...


def make_proposer(config: SpeculativeConfig) -> Proposer:
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    return SuffixProposer(
        config.suffix_max_depth,
        config.suffix_max_cached_requests,
        config.suffix_min_token_prob,
        config.suffix_max_spec_factor,
        config.suffix_max_request_tokens,
        config.suffix_max_worker_tokens,
        config.suffix_max_worker_bytes,
    )


@dataclass
class _Adapt:
    """One sequence's acceptance history (``Sequence.draft_adapt``)."""

    length: int  # drafts of the next verification, before the step's caps
    mean_accepted: float
    mean_rejected: float = PRIOR_MEAN_REJECTED  # verifications that ended in a rejection
    idle_steps: int = 0  # steps since it stopped drafting (0: drafting)
    probe_every: int = PROBE_EVERY // 2  # doubled at each stop


def paying_drafts(state: _Adapt, cost: float) -> int:
    """The most drafts ``j`` with ``a ** j > cost`` (``cost`` > 0; the module's docstring),
    ``a`` estimated from ``state``; no limit (``NO_LIMIT``) while none is rejected."""
    if state.mean_accepted <= 0:
        return 0
    a = state.mean_accepted / (state.mean_accepted + state.mean_rejected)
    if a <= cost:
        return 0
    if a >= 1.0:
        return NO_LIMIT
    return max(0, math.ceil(math.log(cost) / math.log(a)) - 1)


class Speculator:
    """The proposer, the per-sequence draft length and the counters."""

    def __init__(
        self,
        config: SpeculativeConfig,
        max_model_len: int,
        bm: BlockManager,
        proposer: Proposer | None = None,
    ) -> None:
        self.config = config
        self.bm = bm  # the scheduler's: lookahead slots are allocated and trimmed in it
        self.max_model_len = max_model_len
        # NOTE: a proposer with ``deferred`` set (a draft model) proposes for the whole batch
        # in the executor, before the target runs: here its drafts are placeholders of the
        # length it will fill, their slots allocated before it writes its KV into them.
        self.proposer = proposer or make_proposer(config)
        self.deferred = bool(getattr(self.proposer, "deferred", False))
        k = self.kmax = config.num_speculative_tokens or 1  # set by the config's check
        self.stats = SpecStats(proposed_per_position=[0] * k, accepted_per_position=[0] * k)
        self._step_drafts = 0  # drafts given out in the step being scheduled
        # A draft row's share of a decode step, measured on this worker (draft_cost.py).
        self.meter = DraftCostMeter()

    def new_step(self) -> None:
        """The scheduler starts a step's batch (``max_draft_tokens_per_step`` counts anew)."""
        self._step_drafts = 0
        self.meter.start()
        new_step = getattr(self.proposer, "new_step", None)
        if new_step is not None:  # the suffix proposer's indexing budget per step
            new_step()

    def enabled_for(self, num_running: int) -> bool:
        limit = self.config.disable_by_batch_size
        return not limit or num_running <= limit

    def lookahead(self, seq: Sequence, n: int, budget: int, num_running: int) -> list[int]:
        """Drafts for ``seq``, scheduled for ``n`` tokens with ``budget`` left, their
        lookahead slots allocated after its own token's; [] (nothing allocated) when it
        does not speculate this step. The caller allocates the sequence's own slot."""
        if n != 1 or not self.enabled_for(num_running):
            return []
        if self.deferred:
            can_draft = getattr(self.proposer, "can_draft", None)
            if can_draft is not None and not can_draft(seq):
                return []  # it would only fill copies of the last token
            drafts = [PLACEHOLDER] * self.length(seq, budget, num_running)
        else:
            drafts = self.drafts(seq, budget, num_running)
        if drafts and not self.bm.allocate_slots(seq, 1 + len(drafts)):
            return []
        self._step_drafts += len(drafts)
        return drafts

    def accept(self, seq: Sequence, num_accepted: int) -> None:
        """The first ``num_accepted`` drafts of ``seq``'s last step were accepted (and
        appended): their KV is valid. Count it, register newly full blocks and release the
        lookahead blocks past the computed tokens. NOTE: the KV the rejected drafts left in
        the slots after them is never read: those positions are recomputed before any
        attention reads them, and a block is registered only once all its tokens are."""
        seq.num_computed_tokens += num_accepted
        self.bm.cache_full_blocks(seq)
        self.bm.trim(seq, seq.num_computed_tokens)

    def drafts(self, seq: Sequence, budget: int, num_running: int = 1) -> list[int]:
        """Draft tokens for ``seq``, about to decode one token with ``budget`` tokens of the
        step left beside ``num_running`` running sequences; [] when it does not speculate."""
        k = self.length(seq, budget, num_running)
        if k <= 0:
            return []
        return list(self.proposer.propose(seq, k)[:k])

    def length(self, seq: Sequence, budget: int, num_running: int = 1) -> int:
        """How many draft tokens ``seq`` may verify this step (0: none)."""
        if seq.params.speculative is False or seq.mm is not None:
            return 0  # opted out; images: M-RoPE positions of drafts are not done
        k = self._adaptive_length(seq, num_running)
        per_step = self.config.max_draft_tokens_per_step
        if per_step:  # NOTE: a hard cap on the step's drafts, whatever the batch size
            k = min(k, max(1, per_step // max(1, num_running)), per_step - self._step_drafts)
        # Room for the bonus token: within max_tokens and the context.
        if seq.params.max_tokens is not None:
            k = min(k, seq.params.max_tokens - seq.num_output_tokens - 1)
        return max(0, min(k, self.max_model_len - seq.num_tokens - 1, budget - 1))

    def _adaptive_length(self, seq: Sequence, num_running: int) -> int:
        kmax = self.kmax
        if not self.config.adaptive:
            return kmax
        state = seq.draft_adapt
        if state is None:
            state = seq.draft_adapt = _Adapt(kmax, PRIOR_MEAN_ACCEPTED)
        k = min(kmax, state.length)
        cost = self.draft_cost(num_running) * max(1, num_running)
        if cost > 0:  # each draft must pay for the share of the step it adds
            k = min(k, paying_drafts(state, cost))
        if state.mean_accepted >= MIN_MEAN_ACCEPTED and k >= 1:
            state.idle_steps = 0
            return k
        if state.idle_steps == 0:  # it stops: probe half as often as the last time
            state.probe_every = min(MAX_PROBE_EVERY, 2 * state.probe_every)
        state.idle_steps += 1
        if state.idle_steps % state.probe_every == 0:
            return 1
        return 0

    def draft_cost(self, num_running: int) -> float:
        """One draft row's share of a decode step of ``num_running`` sequences: measured
        (``measure_draft_cost``) once this batch size has enough steps, else configured."""
        if self.config.measure_draft_cost:
            return self.meter.cost(num_running, self.config.draft_token_cost)
        return self.config.draft_token_cost

    def step_done(self, batch: int, drafts: int, decodes_only: bool) -> None:
        """The step has sampled (``batch`` sequences, ``drafts`` draft rows; ``decodes_only``:
        no prompt chunk in it): its time feeds the measured draft cost."""
        self.meter.observe(batch, drafts, decodes_only)

    def observe(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """A verification of ``num_drafts`` tokens of ``seq`` accepted the first
        ``num_accepted``."""
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_drafts
        s.num_accepted_tokens += num_accepted
        for i in range(num_drafts):
            s.proposed_per_position[i] += 1
            s.accepted_per_position[i] += i < num_accepted
        state = seq.draft_adapt
        if state is not None:
            state.mean_accepted += EMA_WEIGHT * (num_accepted - state.mean_accepted)
            rejected = float(num_accepted < num_drafts)
            state.mean_rejected += EMA_WEIGHT * (rejected - state.mean_rejected)
            if num_accepted == num_drafts:
                state.length = max(state.length, 2 * num_drafts)
            else:
                state.length = max(1, num_accepted + 1, num_drafts // 2)
            state.length = min(state.length, self.kmax)

    def finished(self, seq: Sequence) -> None:
        self.proposer.finished(seq)
