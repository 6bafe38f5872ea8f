"""Pooling requests: one forward pass over each whole prompt, a pooled hidden state out
(an embedding, or a classification head's scores) instead of generated tokens.

NOTE (own batches, not the scheduler's chunked prefill): a pooling request keeps no KV after
its forward pass, so it takes no KV blocks at all. Pooling requests queue here, apart from
the scheduler; an engine step with pooling work runs one batch of whole prompts (prompts in
arrival order up to ``max_num_batched_tokens``, at least one) with the KV write switched
off. The KV cache and the block manager never see them, a pooling model needs only a token
KV cache, and a bidirectional encoder family would use the same path. What this gives up:
prefix-cache reuse of repeated prompts, and chunking (a prompt of up to ``max_model_len``
tokens runs in one pass, as vLLM runs pooling prompts unchunked by default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.layers.attention import AttentionMetadata, PrefillSegment
from services.engine.pooling_params import PoolingOutput, PoolingParams

logger = logging.getLogger(__name__)


def pooling_task(setting: str, arch: str, hf_config: Any) -> str | None:
    """The task a model is served for: None (generation), "embed" or "classify".
    ``setting`` is EngineConfig.pooling ("auto": by architecture)."""
    if setting == "none":
        return None
    if setting == "auto":
        if arch.endswith("ForSequenceClassification"):
            return "classify"
        return "embed" if arch.endswith("Model") else None
    if hasattr(hf_config, "vision_config"):
        raise ValueError("pooling is not supported for vision-language models")
    return setting


def pooling_hook(
    task: str | None, tokenizer: Any, classifier_from_tokens: str | None
) -> Callable[[nn.Module], None] | None:
    """The model runner's ``pooling_hook``: None for a generative model."""
    if task is None:
        return None
    if classifier_from_tokens:
        return score_from_tokens(tokenizer, classifier_from_tokens)
    return lambda model: None


def score_from_tokens(tokenizer: Any, tokens: str) -> Callable[[nn.Module], None]:
    """A model hook (run after loading, before weights are packed) that makes a causal LM a
    one-label classifier from its ``lm_head`` rows of two tokens "no,yes": the score is
    ``logit(yes) - logit(no)``, so its sigmoid is P(yes) of the two (Qwen3-Reranker, as
    vLLM's ``classifier_from_token``)."""
    names = [t.strip() for t in tokens.split(",")]
    if len(names) != 2 or not all(names):
        raise ValueError(f"classifier_from_tokens needs two tokens 'no,yes', got {tokens!r}")
    ids = [tokenizer.convert_tokens_to_ids(n) for n in names]
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or i == unk for i in ids):
        raise ValueError(f"classifier_from_tokens: {names} are not single tokens of the model")

    def hook(model: Any) -> None:
        w = model.lm_head.weight
        model.score = nn.Linear(w.shape[1], 1, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            model.score.weight.copy_((w[ids[1]] - w[ids[0]]).unsqueeze(0))

    return hook


@dataclass
class _Pending:
    request_id: str
    token_ids: list[int]
    params: PoolingParams


class Pooler:
    """The pooling queue of one engine and the batches it runs (see the module NOTE)."""

    def __init__(
        self,
        model: Any,
        device: torch.device,
        task: str,
        max_model_len: int,
        max_batch_tokens: int,
        failure: Callable[[str, BaseException], str],
    ) -> None:
        self.model = model
        self.device = device
        self.task = task
        # An encoder's learned positions may end before the engine's context length.
        self.max_model_len = min(max_model_len, getattr(model, "max_positions", max_model_len))
        self.max_batch_tokens = max_batch_tokens
        # A failed request's error text (FaultJudge.failure: it never raises; whether the
        # engine itself is at fault is end_step's call, after a self-check).
        self.failure = failure
        # Told after each batch whether any request of it succeeded (FaultJudge.end_step).
        self.end_step: Callable[[bool], None] | None = None
        self.hidden_size = int(model.model.embed_tokens.embedding_dim)
        if task == "classify" and not hasattr(model, "score"):
            raise ValueError(
                "this model has no classification head: use a *ForSequenceClassification "
                "checkpoint, or classifier_from_tokens for a yes/no reranker"
            )
        self.waiting: list[_Pending] = []
        self.num_tokens_computed = 0  # prompt tokens run through the model (a metric)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.waiting)

    def validate(self, token_ids: list[int], params: PoolingParams) -> None:
        """ValueError for a request this model cannot pool."""
        if params.task != self.task:
            raise ValueError(f"this model serves the {self.task!r} task, not {params.task!r}")
        if not token_ids:
            raise ValueError("the input is empty")
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"the input has {len(token_ids)} tokens, more than the model's context "
                f"length of {self.max_model_len}"
            )
        vocab = int(self.model.model.embed_tokens.num_embeddings)
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        if params.dimensions is not None and params.dimensions > self.hidden_size:
            raise ValueError(
                f"dimensions {params.dimensions} exceeds the model's embedding size "
                f"{self.hidden_size}"
            )

    def add(self, request_id: str, token_ids: list[int], params: PoolingParams) -> None:
        self.validate(token_ids, params)
        if any(p.request_id == request_id for p in self.waiting):
            raise ValueError(f"request id {request_id!r} is already running")
        self.waiting.append(_Pending(request_id, list(token_ids), params))

    def abort(self, request_id: str) -> bool:
        n = len(self.waiting)
        self.waiting = [p for p in self.waiting if p.request_id != request_id]
        return len(self.waiting) != n

    def step(self) -> list[PoolingOutput]:
        """Run the next batch; a batch that raises is re-run one request at a time, and a
        request that fails alone gets ``error``. Raises (fault_judge.EngineFault) only when
        the engine itself is at fault."""
        out = self._step()
        if out and self.end_step is not None:
            self.end_step(any(o.error is None for o in out))
        return out

    def _step(self) -> list[PoolingOutput]:
        batch: list[_Pending] = []
        tokens = 0
        while self.waiting and (not batch or tokens + len(self.waiting[0].token_ids)
                                <= self.max_batch_tokens):  # fmt: skip
            tokens += len(self.waiting[0].token_ids)
            batch.append(self.waiting.pop(0))
        try:
            return self._outputs(batch, self.run(batch))
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(batch) == 1:
                return [self._failed(batch[0], self.failure("pooling its input", exc))]
            logger.warning("a pooling batch of %d failed (%r); one by one", len(batch), exc)
        out = []
        for p in batch:
            try:
                out += self._outputs([p], self.run([p]))
            except Exception as exc:  # noqa: BLE001
                out.append(self._failed(p, self.failure("pooling its input", exc)))
        return out

    def _outputs(self, batch: list[_Pending], pooled: list[torch.Tensor]) -> list[PoolingOutput]:
        self.num_tokens_computed += sum(len(p.token_ids) for p in batch)
        return [
            PoolingOutput(p.request_id, v.tolist(), len(p.token_ids))
            for p, v in zip(batch, pooled, strict=True)
        ]

    @staticmethod
    def _failed(p: _Pending, error: str) -> PoolingOutput:
        return PoolingOutput(p.request_id, [], len(p.token_ids), error=error)

    def self_check(self) -> bool:
        """Pool a one-token input the engine makes itself (fault_judge.py); raises when the
        model cannot run at all."""
        self.run([_Pending("__self_check__", [0], PoolingParams(task=self.task))])
        return True

    @torch.inference_mode()
    def run(self, batch: list[_Pending]) -> list[torch.Tensor]:
        """One forward pass over the batch's whole prompts; the pooled vector of each."""
        ids: list[int] = []
        pos: list[int] = []
        segments: list[PrefillSegment] = []
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        for p in batch:
            n = len(p.token_ids)
            segments.append(PrefillSegment(len(ids), n, n, empty))
            ids.extend(p.token_ids)
            pos.extend(range(n))
        meta = AttentionMetadata(slot_mapping=empty, prefills=segments, write_kv=False)
        dev = self.device
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            meta,
        )
        # The pooled token: the last (decoders), or the first, [CLS] (encoders).
        cls = getattr(self.model, "pooling_type", "last") == "cls"
        last = torch.tensor([s.start if cls else s.start + s.num_tokens - 1 for s in segments],
                            device=dev)  # fmt: skip
        states = hidden.index_select(0, last)
        if self.task == "classify":
            logits = self.model.score(states).float()
            scores = logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=-1)
            return list(scores.cpu())
        states = states.float()
        out = []
        for p, v in zip(batch, states, strict=True):
            if p.params.dimensions is not None:
                v = v[: p.params.dimensions]
            out.append(F.normalize(v, dim=-1).cpu())
        return out
