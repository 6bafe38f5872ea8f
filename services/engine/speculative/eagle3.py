"""EAGLE-3 speculation (``{"method": "eagle3", "model": HEAD}``): a one-layer draft head reads
the target's hidden states of three layers (models/llama_eagle3.py) and proposes ``k`` tokens.

The flow. Forward pre-hooks on the target's three layers keep their input hidden states of each
step; ``after_target`` files them per sequence (``_EagleState``: positions, the tokens computed
there, the states through ``fc``). Before the next target step, ``fill`` runs the head: a first
pass over every scheduled sequence's filed positions whose tokens stand (a rejected draft's do
not), the input at position ``p`` being the token at ``p + 1`` with the target's state at ``p``
(as EAGLE's shifted inputs); its last row samples the first draft; each further pass feeds the
draft just sampled with the head's own state from the pass before. The head's KV lives at the
target's block ids as the draft model's does (draft_model.py); positions computed from the
head's own states are recomputed from the target's once the verification has them.

Filed states wait at most one step for the head (``fill`` runs it over every scheduled
sequence's), except a sequence's that was not scheduled: a preempted sequence (waiting for
its recompute, which files new states from its first recomputed position) or a finished one
drops them at the next filing, so that a queue of preempted sequences holds no device memory
of up to a prompt chunk each; a running sequence left out of one step keeps its few rows.

PD: the prefill worker's states of the prompt go to the decode worker with the KV
(``export_states``, ``import_states``; handoff.py says why and how), so its first decode runs
the head over the prompt as a co-located worker's does; a prefill-side prefix-cache hit sends
the states kept with the hit blocks (kept_states.py). NOTE: where no target state is filed
(a decode worker given none, or only the last rows of a long prompt; a hit the prefill side
kept no states for; a co-located hit computed by a sequence that did not run the head), the head has no KV or stale KV there: its
drafts are worse, never the output, which the verification decides alone. A decode whose
last position has no state drafts nothing (``can_draft``): its first decode files the state
the next one drafts from.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from services.engine.model_loader import read_tensor
from services.engine.model_runner import ModelRunner, is_decode
from services.engine.models.llama_eagle3 import Eagle3LlamaForCausalLM, aux_layer_ids
from services.engine.scheduler_output import ScheduledSeq
from services.engine.sequence import SequenceStatus
from services.engine.speculative.draft_model import (
    DRAFT_SEED_SALT,
    DraftModelProposer,
    _DraftKV,
    _View,
    draft_runner,
    no_drafts,
)
from services.engine.speculative.handoff import DraftStates
from services.engine.speculative.kept_states import KeptStates

if TYPE_CHECKING:
    from services.engine.config import EngineConfig
    from services.engine.sequence import Sequence
    from services.engine.speculative.config import SpeculativeConfig

logger = logging.getLogger(__name__)


@dataclass
class _EagleState(_DraftKV):
    """Target hidden states filed for a sequence and not yet run through the head."""

    start: int = 0  # position of the first filed state
    fed: list[int] | None = None  # the token the target computed at each filed position
    hidden: torch.Tensor | None = None  # [len(fed), hidden], through fc


class Eagle3Proposer(DraftModelProposer):
    def __init__(
        self,
        runner: ModelRunner,
        target: ModelRunner,
        layer_ids: list[int],
        seed: int,
        chunk: int = 2048,
        block_size: int = 16,
    ):
        # ``chunk``: filed positions one sequence's first pass takes in a step (the engine's
        # step token budget): an imported prompt's states (PD) are run over several steps,
        # as the prompt's own prefill chunks were, not in one step that stalls every stream.
        super().__init__(runner, target.model.vocab_size, seed, chunk)
        self.head: Eagle3LlamaForCausalLM = runner.model  # type: ignore[assignment]
        self._aux: dict[int, torch.Tensor] = {}
        # The sequences holding filed states (weakly: a sequence dropped by the engine goes).
        self._holding: weakref.WeakValueDictionary[int, Sequence] = weakref.WeakValueDictionary()
        # The exported prompts' states by prefix-cache block, for a later hit (PD's prefill
        # side; kept_states.py says why).
        self.kept = KeptStates(block_size)
        layers: Any = target.model.model.layers
        for slot, i in enumerate(layer_ids):
            layers[i].register_forward_pre_hook(functools.partial(self._capture, slot))

    @classmethod
    def load(
        cls, spec: SpeculativeConfig, config: EngineConfig, max_model_len: int, target: ModelRunner
    ) -> Eagle3Proposer:
        layers = getattr(getattr(target.model, "model", None), "layers", None)
        if layers is None:
            raise ValueError("EAGLE-3 heads need a Llama/Qwen-style target")
        runner = draft_runner(spec, config, max_model_len, target, Eagle3LlamaForCausalLM)
        head: Any = runner.model
        ids = aux_layer_ids(head, len(layers))
        target_hidden = target.model.model.embed_tokens.weight.shape[1]
        if head.model.fc.in_features != 3 * target_hidden:
            raise ValueError(f"the EAGLE-3 head's fc takes {head.model.fc.in_features} features; "
                             f"the target's 3 layers give {3 * target_hidden}")  # fmt: skip
        if not head.has_embedding:
            head.model.embed_tokens = (
                target.model.model.embed_tokens if target.tp.size == 1 else whole_embedding(target)
            )
        # NOTE: a replayed CUDA graph runs no forward hooks: the target's decode-only steps
        # would file no hidden states. Its decodes run eagerly instead (untested on a GPU).
        target.graphs = None
        return cls(
            runner, target, ids, config.seed, config.max_num_batched_tokens, config.block_size
        )

    def _capture(self, slot: int, module: Any, args: tuple[Any, ...]) -> None:
        # NOTE: under tensor parallelism too the layers' inputs are whole on the driver (the
        # residual stream is all-reduced), so the head runs whole there (TP=1).
        self._aux[slot] = args[1]  # the layer's input: (positions, x, rotary, meta)

    @torch.inference_mode()
    def after_target(self, scheduled: list[ScheduledSeq]) -> None:
        """File the target's hidden states of the step that just ran ``scheduled`` (in the
        runner's token order: the decodes, then the others)."""
        aux, self._aux = self._aux, {}
        if len(aux) != 3:
            return
        hidden = self.head.combine(torch.cat([aux[0], aux[1], aux[2]], dim=-1))
        order = [s for s in scheduled if is_decode(s)] + [s for s in scheduled if not is_decode(s)]
        if sum(s.num_new_tokens for s in order) != hidden.shape[0]:
            return  # several passes (LoRA slots, a one-by-one retry): nothing filed
        row = 0
        for s in order:
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            fed = seq.token_ids[start : start + s.num_known_tokens] + s.draft_token_ids
            self._file(seq, start, fed, hidden[row : row + n].clone())
            row += n
        self._drop_idle({s.seq.seq_id for s in order})

    def _drop_idle(self, stepped: set[int]) -> None:
        """Drop the filed states of sequences that are no longer running and hold no blocks
        (see the module's docstring); note the ones this step filed. NOTE: a finished prefill
        whose KV awaits export keeps its blocks, and its states go with the KV
        (``export_states``); so does an imported request waiting for a running slot."""
        for seq_id, seq in list(self._holding.items()):
            if seq_id in stepped or seq.status == SequenceStatus.RUNNING or seq.block_table:
                continue
            state = seq.draft_state
            if isinstance(state, _EagleState):
                state.fed = state.hidden = None
            del self._holding[seq_id]

    def _file(self, seq: Sequence, start: int, fed: list[int], hidden: torch.Tensor) -> None:
        state = self._state(seq)
        self._holding[seq.seq_id] = seq
        if state.hidden is not None and state.fed is not None:
            keep = start - state.start
            if 0 <= keep <= len(state.fed):  # contiguous: drop what the new states replace
                state.hidden = torch.cat([state.hidden[:keep], hidden])
                state.fed = state.fed[:keep] + fed
                if seq.exports_draft_states:  # what is sent, and no more (a long prompt)
                    cut = DraftStates(state.start, state.fed, state.hidden).last()
                    state.start, state.fed, state.hidden = cut.start, cut.tokens, cut.hidden
                return
        state.start, state.fed, state.hidden = start, fed, hidden

    def _state(self, seq: Sequence) -> _EagleState:
        state = seq.draft_state
        if not isinstance(state, _EagleState):
            gen = None
            if seq.params.seed is not None:
                gen = torch.Generator().manual_seed((seq.params.seed ^ DRAFT_SEED_SALT) + seq.index)
            state = seq.draft_state = _EagleState([], 0, [], gen)
        return state

    def export_states(self, seq: Sequence) -> DraftStates | None:
        """The states filed for ``seq`` and not yet run through the head (PD's prefill side:
        every computed prompt position, handed to the decode worker with the KV), and before
        them those kept with the prefix-cache blocks a hit skipped (kept_states.py)."""
        state = seq.draft_state
        if not isinstance(state, _EagleState) or state.fed is None or state.hidden is None:
            return None
        states = DraftStates(state.start, list(state.fed), state.hidden)
        return self.kept.complete(states, seq.token_ids, seq.block_hashes)

    def states_form(self) -> tuple[int, torch.dtype]:
        """The width and dtype of a row of ``export_states`` (what ``import_states`` takes)."""
        return self.head.model.fc.out_features, self.runner.dtype

    def import_states(self, seq: Sequence, states: DraftStates) -> None:
        """File ``states`` for ``seq`` (PD's decode side, before its first decode), as the
        prefill worker's step filed them. ValueError if they do not fit ``seq`` or the head."""
        width = self.head.model.fc.out_features
        rows = len(states.tokens)
        if states.hidden.shape != (rows, width):
            raise ValueError(f"draft states of shape {tuple(states.hidden.shape)}, the head "
                             f"takes {rows} x {width}")  # fmt: skip
        if states.start < 0 or states.start + rows > seq.num_computed_tokens:
            raise ValueError(f"draft states for positions [{states.start}, "
                             f"{states.start + rows}) past the {seq.num_computed_tokens} "
                             "computed")  # fmt: skip
        hidden = states.hidden.to(device=self.runner.device, dtype=self.runner.dtype)
        self._file(seq, states.start, list(states.tokens), hidden)

    def can_draft(self, seq: Sequence) -> bool:
        """Whether the head's first pass for ``seq``, about to decode, reaches its last
        computed position (filed target states whose tokens stand, at most ``chunk`` of
        them): else its drafts could only be placeholders. Not yet on the decode side of PD (no states for the imported
        prompt) until its first decode files one, nor after the head failed."""
        state = seq.draft_state
        if not isinstance(state, _EagleState):
            return False
        ready = self._ready(seq)
        return ready <= self.chunk and state.start + ready == seq.num_tokens - 1

    def _ready(self, seq: Sequence) -> int:
        """How many filed positions the head can run now: their tokens stand, the token after
        each is known, and their blocks are the sequence's."""
        state = seq.draft_state
        if not isinstance(state, _EagleState) or state.fed is None:
            return 0
        limit = min(
            len(state.fed), seq.num_computed_tokens - state.start, seq.num_tokens - 1 - state.start
        )
        m = 0
        while m < limit and state.fed[m] == seq.token_ids[state.start + m]:
            m += 1
        return m

    def _propose(self, scheduled: list[ScheduledSeq], items: list[ScheduledSeq]) -> None:
        batch: list[ScheduledSeq] = []
        states: list[_EagleState] = []
        for s in scheduled:
            if s.seq.exports_draft_states:
                continue  # its states go to the decode worker, which runs the head on them
            m = min(self._ready(s.seq), self.chunk)
            if m:
                state = self._state(s.seq)
                batch.append(ScheduledSeq(_View(s.seq, state.start, state.start + m), m))  # type: ignore[arg-type]
                states.append(state)
        drafting = [s for s in items if self._ends_at_last(s.seq, batch)]
        no_drafts([s for s in items if s not in drafting])
        if not batch:
            return
        hidden = [st.hidden[: b.num_new_tokens] for st, b in zip(states, batch, strict=True)]  # type: ignore[index]
        last = self._run(batch, hidden)
        for state, b in zip(states, batch, strict=True):
            state.start += b.num_new_tokens
            state.fed = state.fed[b.num_new_tokens :] if state.fed else None
            state.hidden = state.hidden[b.num_new_tokens :] if state.hidden is not None else None
            if not state.fed:
                state.fed = state.hidden = None
        self._draft(drafting, batch, last)

    @staticmethod
    def _ends_at_last(seq: Sequence, batch: list[ScheduledSeq]) -> bool:
        """Whether the first pass reaches ``seq``'s last computed position (whose output
        predicts the token after the last)."""
        return any(
            b.seq.seq_id == seq.seq_id and b.seq.num_tokens == seq.num_tokens - 1 for b in batch
        )

    def _run(
        self, batch: list[ScheduledSeq], hidden: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One pass of the head: the logits of each item's last position (in ``batch``'s order)
        and each item's own state there, by seq id."""
        decode = [is_decode(b) for b in batch]
        order = [i for i in range(len(batch)) if decode[i]] + [
            i for i in range(len(batch)) if not decode[i]
        ]
        self.head.hidden_in = torch.cat([hidden[i] for i in order]).to(self.runner.dtype)
        logits = self.runner.execute(batch)
        out, ends, row = self.head.hidden_out, {}, 0
        for i in order:
            row += batch[i].num_new_tokens
            ends[batch[i].seq.seq_id] = out[row - 1 : row]
        return logits, ends

    def _draft(
        self,
        items: list[ScheduledSeq],
        batch: list[ScheduledSeq],
        first: tuple[torch.Tensor, dict[int, torch.Tensor]],
    ) -> None:
        """Sample the drafts of ``items`` from the first pass's logits, then one pass per
        further draft."""
        if not items:
            return
        logits, ends = first
        index = {b.seq.seq_id: i for i, b in enumerate(batch)}
        views = {s.seq.seq_id: batch[index[s.seq.seq_id]].seq for s in items}
        rows = torch.tensor([index[s.seq.seq_id] for s in items], device=logits.device)
        drafts: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        active = list(range(len(items)))
        logits = logits[rows]
        while True:
            tokens, dists = self._sample(logits, [items[i].seq for i in active])
            for i, token, dist in zip(active, tokens, dists, strict=True):
                drafts[i].append(token)
                if dist is not None:
                    probs[i].append(dist)
            active = [i for i in active if len(drafts[i]) < len(items[i].draft_token_ids)]
            if not active:
                break
            step: list[ScheduledSeq] = []
            for i in active:
                view: Any = views[items[i].seq.seq_id]
                view.num_computed_tokens = view.num_tokens
                view.token_ids.append(drafts[i][-1])
                step.append(ScheduledSeq(view, 1))
            logits, ends = self._run(step, [ends[items[i].seq.seq_id] for i in active])
        for item, toks, rows_q in zip(items, drafts, probs, strict=True):
            item.draft_token_ids = toks
            item.draft_probs = torch.stack(rows_q) if rows_q else None


# The target's input embedding as a checkpoint names it (a bare decoder's checkpoint drops
# "model.", as the models' load_weights accepts).
EMBEDDING_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight")


def whole_embedding(target: ModelRunner) -> torch.nn.Embedding:
    """The target's whole input embedding, read from its checkpoint (that tensor only): a
    tensor-parallel rank holds a slice of the vocabulary, whose lookup is a collective the
    head cannot join."""
    if target.config.load_format == "dummy":
        raise ValueError("an EAGLE-3 head without an embedding needs the target's checkpoint "
                         "under tensor parallelism (load_format 'dummy' has none)")  # fmt: skip
    tensor = read_tensor(str(target.model_path), EMBEDDING_NAMES)
    if tensor is None:
        raise ValueError(f"no {EMBEDDING_NAMES[0]} in the target checkpoint {target.model_path}")
    rows, width = tensor.shape
    embedding = torch.nn.Embedding(rows, width, device=target.device, dtype=target.dtype)
    embedding.weight.requires_grad_(False).copy_(tensor)
    return embedding
