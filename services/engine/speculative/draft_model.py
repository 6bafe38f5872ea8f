"""Draft-model speculation (vLLM's ``draft_model`` method): a smaller model with the target's
vocabulary proposes ``k`` tokens per verification, ``k`` forward passes of it over the batch's
speculating sequences, each one sampling the next draft token.

Where its KV lives. In a cache of its own (``ModelRunner`` with ``num_blocks``) indexed by the
target's block ids: a block the scheduler gives a sequence holds the target's KV in the
target's cache and the draft's at the same index of the draft's. So the draft needs no block
manager of its own, its lookahead slots are the target's (allocated by ``Speculator.lookahead``
before this runs), and rollback is the target's (``Speculator.accept`` trims both at once);
nothing can leak or run out separately. The price: the draft's cache has as many blocks as the
target's (its bytes per block are the draft's, a fraction of the target's); one budget pays for
both (memory.py), so the target gets fewer blocks than without a draft.

What the draft's KV holds is tracked per sequence (``_DraftKV``, on ``Sequence.draft_state``):
the tokens it was computed for and the blocks it was written to. Each proposal first feeds what
is missing (the accepted drafts' successor, the target's bonus token; the whole context the
first time, after a preemption, or on the decode side of PD, where only the target's KV arrived:
the draft's is rebuilt there rather than pushed, as it is cheap and keeps PD's transfer and its
KV layout fingerprint the target's alone). A missing context longer than ``chunk`` (the step
token budget) is caught up ``chunk`` positions a step before the sequence drafts again.

NOTE: nothing here can change the output, only the acceptance: the draft's KV may be stale
where a prefix-cache block was computed by a sequence that never ran the draft, or written by
another's draft with floating-point differences; the verification decides every token.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from services.engine.model_loader import load_hf_config, resolve_model
from services.engine.model_runner import ModelRunner, is_decode
from services.engine.sampler import apply_logit_bias, draw, row_probs
from services.engine.scheduler_output import ScheduledSeq

if TYPE_CHECKING:
    from services.engine.config import EngineConfig
    from services.engine.sequence import Sequence
    from services.engine.speculative.config import SpeculativeConfig

logger = logging.getLogger(__name__)

# Mixed into a seeded request's seed for its draft draws (its own generator is the target's).
DRAFT_SEED_SALT = 0x5EED_D4AF


@dataclass
class _DraftKV:
    """What the draft's cache holds for one sequence."""

    tokens: list[int]  # token at each position whose draft KV was computed
    known: int  # leading positions of ``tokens`` that were the sequence's (not drafts)
    blocks: list[int]  # the sequence's block table when it was written
    generator: torch.Generator | None  # a seeded request's draft draws


class _View:
    """The part of a ``Sequence`` that ``ModelRunner.execute`` reads, for the draft: the
    sequence's tokens and the drafts so far, what of them the draft's cache holds, the
    target's blocks."""

    def __init__(self, seq: Sequence, computed: int, shifted_to: int | None = None) -> None:
        """``shifted_to``: the tokens at positions ``[0, shifted_to)`` are those at ``[1,
        shifted_to]`` (an EAGLE head's inputs), and a one-token pass is a decode."""
        self.seq_id = seq.seq_id
        if shifted_to is None:
            self.token_ids = list(seq.token_ids)
            self.num_prompt_tokens = seq.num_prompt_tokens
        else:
            self.token_ids = seq.token_ids[1 : shifted_to + 1]
            self.num_prompt_tokens = 0
        self.num_computed_tokens = computed
        self.block_table = seq.block_table
        self.lora = None
        self.mm = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DraftModelProposer:
    """Fills the placeholder drafts of a step's speculating sequences (``fill``)."""

    deferred = True  # proposes in the executor, for the whole batch (see Speculator)

    def __init__(self, runner: ModelRunner, vocab_size: int, seed: int, chunk: int = 2048) -> None:
        self.runner = runner
        self.vocab_size = vocab_size  # the target's: drafts and their distributions are in it
        self.generator = torch.Generator().manual_seed(seed ^ DRAFT_SEED_SALT)
        # Positions of a sequence the draft computes in a step (the engine's step token
        # budget): a context it lacks (a long prompt, PD's imported one, a preempted
        # sequence's) is caught up over several steps, not in one that stalls every stream.
        self.chunk = chunk

    @classmethod
    def load(
        cls, spec: SpeculativeConfig, config: EngineConfig, max_model_len: int, target: ModelRunner
    ) -> DraftModelProposer:
        """The draft model of ``spec`` on the target's device, with a cache of the target's
        number of blocks."""
        runner = draft_runner(spec, config, max_model_len, target)
        return cls(runner, target.model.vocab_size, config.seed, config.max_num_batched_tokens)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        return []  # NOTE: never called: deferred proposals are made by ``fill``

    def finished(self, seq: Sequence) -> None:
        """Nothing is kept beyond the sequence itself."""

    def after_target(self, scheduled: list[ScheduledSeq]) -> None:
        """The target ran ``scheduled`` (an EAGLE head keeps its hidden states)."""

    def can_draft(self, seq: Sequence) -> bool:
        """Whether the draft's first pass for ``seq`` (what its cache lacks, up to the last
        token) fits in ``chunk`` positions; else ``fill`` catches it up first."""
        return seq.num_tokens - self._valid(seq) <= self.chunk

    def fill(self, scheduled: list[ScheduledSeq]) -> None:
        """Replace the placeholder drafts of ``scheduled`` with the draft model's tokens (and
        distributions, for sampling requests). NOTE: if the draft model fails, the drafts
        become copies of the last token without distributions: still verified exactly."""
        items = [s for s in scheduled if s.draft_token_ids]
        try:
            self._propose(scheduled, items)
        except Exception:  # noqa: BLE001 - the target's step goes on without real drafts
            logger.exception("the draft model failed; verifying placeholder drafts")
            for item in scheduled:
                item.seq.draft_state = None
            no_drafts(items)

    @torch.inference_mode()
    def _catch_up(self, scheduled: list[ScheduledSeq]) -> None:
        """One pass of at most ``chunk`` positions for each decoding sequence whose draft
        cache lacks more than that (``can_draft`` false): positions the target computed."""
        batch: list[ScheduledSeq] = []
        done: list[tuple[Sequence, int]] = []
        for s in scheduled:
            seq = s.seq
            if s.draft_token_ids or not is_decode(s):
                continue
            valid = self._valid(seq)
            n = min(self.chunk, seq.num_computed_tokens - valid)
            if n > 0 and seq.num_tokens - valid > self.chunk:
                batch.append(ScheduledSeq(_View(seq, valid), n))  # type: ignore[arg-type]
                done.append((seq, valid + n))
        if not batch:
            return
        self.runner.execute(batch)
        for seq, upto in done:
            state = seq.draft_state
            assert isinstance(state, _DraftKV)
            state.tokens, state.known = seq.token_ids[:upto], upto
            state.blocks = list(seq.block_table)

    @torch.inference_mode()
    def _propose(self, scheduled: list[ScheduledSeq], items: list[ScheduledSeq]) -> None:
        self._catch_up(scheduled)
        if not items:
            return
        views = [_View(s.seq, self._valid(s.seq)) for s in items]
        drafts: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        for j in range(max(len(s.draft_token_ids) for s in items)):
            active = [i for i, s in enumerate(items) if j < len(s.draft_token_ids)]
            batch = [ScheduledSeq(views[i], views[i].num_tokens - views[i].num_computed_tokens)  # type: ignore[arg-type]
                     for i in active]  # fmt: skip
            logits = self.runner.execute(batch)
            tokens, dists = self._sample(logits, [items[i].seq for i in active])
            for i, token, dist in zip(active, tokens, dists, strict=True):
                view = views[i]
                view.num_computed_tokens = view.num_tokens
                view.token_ids.append(token)
                drafts[i].append(token)
                if dist is not None:
                    probs[i].append(dist)
        for item, view, toks, rows in zip(items, views, drafts, probs, strict=True):
            item.draft_token_ids = toks
            item.draft_probs = torch.stack(rows) if rows else None
            state = item.seq.draft_state
            assert isinstance(state, _DraftKV)
            state.tokens = view.token_ids[: view.num_computed_tokens]
            state.known = item.seq.num_tokens
            state.blocks = list(item.seq.block_table)

    def _valid(self, seq: Sequence) -> int:
        """Leading positions of ``seq`` whose draft KV is in its blocks (at most all but the
        last token: the draft's first pass computes at least that one)."""
        state = seq.draft_state
        if not isinstance(state, _DraftKV):
            gen = None
            if seq.params.seed is not None:
                gen = torch.Generator().manual_seed((seq.params.seed ^ DRAFT_SEED_SALT) + seq.index)
            seq.draft_state = _DraftKV([], 0, [], gen)
            return 0
        limit = min(len(state.tokens), seq.num_tokens - 1)
        valid = min(state.known, limit)
        tokens = seq.token_ids
        while valid < limit and state.tokens[valid] == tokens[valid]:
            valid += 1  # drafts the verification accepted
        bs = self.runner.block_size
        blocks = 0
        table = seq.block_table
        while blocks < min(len(table), len(state.blocks)) and table[blocks] == state.blocks[blocks]:
            blocks += 1  # NOTE: preempted sequences come back on other blocks
        return min(valid, blocks * bs)

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """The next draft token of each row: the argmax for greedy requests (no distribution:
        verified by the target's own greedy choice), else a draw from the draft's distribution
        with the request's logit bias, temperature, top-k/p and min-p, returned with it."""
        vocab = self.vocab_size
        if logits.shape[1] > vocab:
            logits = logits[:, :vocab]
        elif logits.shape[1] < vocab:
            pad = logits.new_full((logits.shape[0], vocab - logits.shape[1]), float("-inf"))
            logits = torch.cat([logits, pad], dim=1)
        logits = apply_logit_bias(logits, seqs)
        tokens = logits.argmax(dim=-1).tolist()  # on the device: B integers cross
        dists: list[torch.Tensor | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if not rows:
            return tokens, dists
        sub = logits[torch.tensor(rows, device=logits.device)].cpu()
        q = row_probs(sub, [seqs[i] for i in rows], [tokens[i] for i in rows])
        for j, i in enumerate(rows):
            state = seqs[i].draft_state
            gen = state.generator if isinstance(state, _DraftKV) and state.generator else None
            u = torch.rand(1, dtype=torch.float64, generator=gen or self.generator)
            tokens[i] = draw(q[j : j + 1], u)[0]
            dists[i] = q[j]
        return tokens, dists


def no_drafts(items: list[ScheduledSeq]) -> None:
    """Fill ``items``' placeholders with copies of their last token, without distributions:
    verified like any guess (exact, and rarely accepted)."""
    for item in items:
        item.draft_token_ids = [item.seq.token_ids[-1]] * len(item.draft_token_ids)
        item.draft_probs = None


def draft_runner(
    spec: SpeculativeConfig,
    config: EngineConfig,
    max_model_len: int,
    target: ModelRunner,
    model_class: type[torch.nn.Module] | None = None,
) -> ModelRunner:
    """A runner of ``spec.model`` on the target's device, with a KV cache of the target's
    number of blocks, no LoRA, no pooling."""
    assert spec.model is not None
    path = resolve_model(spec.model)
    hf_config = load_hf_config(path)
    max_pos = int(getattr(hf_config, "max_position_embeddings", max_model_len))
    if max_pos < max_model_len:
        raise ValueError(f"the draft model's max_position_embeddings {max_pos} is below the "
                         f"target's max_model_len {max_model_len}")  # fmt: skip
    draft_config = dataclasses.replace(
        config, model=path, served_model_name=None, speculative_config=None,
        kv_cache_bytes=None, kv_host_pool_bytes=0, lora_modules=[], enable_lora=False,
        pooling="none", classifier_from_tokens=None,
        # NOTE: whole, on the driver (rank 0), under tensor parallelism too: a small model's
        # passes gain nothing from splitting, and the ranks verify its drafts as any others.
        tensor_parallel_size=1, enable_expert_parallel=False, eplb_placement=None,
        # NOTE: an EAGLE head reads hidden states set beside its input: no CUDA graphs.
        load_format="auto" if model_class is not None else config.load_format,
        enforce_eager=config.enforce_eager or model_class is not None,
    )  # fmt: skip
    runner = ModelRunner(draft_config, hf_config, path, max_model_len,
                         num_blocks=target.num_blocks, model_class=model_class)  # fmt: skip
    logger.info("draft model %s: %d layers, KV cache of %d blocks", path, runner.num_layers,
                runner.num_blocks)  # fmt: skip
    return runner
