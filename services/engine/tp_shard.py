"""Tensor-parallel sharding of a model built on the meta device, before its weights load.

Megatron's split, as vLLM does it:
- column-parallel: the fused q/k/v and gate/up projections keep one matmul per rank, each
  part sliced by rows (the rank's query heads, its KV heads, its share of the intermediate);
  a rank holds ``num_heads / N`` query heads and ``num_kv_heads / N`` KV heads, or one KV
  head replicated when N > num_kv_heads;
- row-parallel: ``o_proj`` and ``down_proj`` take the matching input columns, and their
  partial sums are added across ranks (one all-reduce after attention, one after the MLP);
- vocab-parallel: the embedding holds a contiguous range of the vocabulary (rows of other
  ranks' tokens are zero, an all-reduce fills them in) and so does the lm_head, whose
  logits are gathered;
- MoE: every expert sliced like an MLP (tensor parallel), or, with expert parallelism,
  whole experts per rank (``ExpertPlacement``); the router is replicated and the block's
  partial sums (routed experts plus the sliced shared expert) take one all-reduce.

Each sliced module gets ``tp_slice = (dim, start)``: the loader copies the checkpoint
tensor's ``[start, start + local size)`` along ``dim`` into its weight (``llama.tp_load``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.distributed import TPGroup
from services.engine.eplb import ExpertPlacement
from services.engine.layers.moe import Experts
from services.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, PackedLinear
from services.engine.models.moe import SparseMoeBlock


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[start, start + rows)`` of the embedding of a ``vocab``-token vocabulary
    (``num_embeddings`` stays the whole vocabulary: the input check reads it)."""

    def __init__(self, vocab: int, rows: int, dim: int, start: int, tp: TPGroup) -> None:
        super().__init__(rows, dim)
        self.num_embeddings = vocab
        self.rows, self.start, self.tp = rows, start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(torch.where(mine, local, 0), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


def _slice(module: nn.Module, dim: int, start: int) -> None:
    """Load ``module.weight`` from the checkpoint's ``[start, ...)`` along ``dim``. NOTE: on the
    module, not the parameter: moving the model to its device makes new parameters."""
    module.tp_slice = (dim, start)  # type: ignore[assignment]


def _divide(what: str, total: int, n: int) -> int:
    if total % n:
        raise ValueError(f"tensor_parallel_size {n} does not divide {what} ({total})")
    return total // n


def _column(hidden: int, parts: dict[Any, tuple[int, int]], bias: bool) -> PackedLinear:
    """A fused projection with one (local size, checkpoint start) per part."""
    layer = PackedLinear(hidden, {k: size for k, (size, _) in parts.items()}, bias)
    layer.sources = {k: start for k, (_, start) in parts.items()}
    return layer


def _row(inputs: int, out: int, start: int) -> nn.Linear:
    layer = nn.Linear(inputs, out, bias=False)
    _slice(layer, 1, start)
    return layer


def shard_attention(a: LlamaAttention, tp: TPGroup) -> None:
    d, r, n = a.head_dim, tp.rank, tp.size
    heads = _divide("num_attention_heads", a.num_heads, n)
    if a.num_kv_heads >= n:
        kv_heads = _divide("num_key_value_heads", a.num_kv_heads, n)
        kv_first = r * kv_heads
    else:
        _divide("the tensor-parallel size by num_key_value_heads", n, a.num_kv_heads)
        kv_heads, kv_first = 1, r * a.num_kv_heads // n
    hidden = a.qkv_proj.in_features
    bias = a.qkv_proj.bias is not None
    a.qkv_proj = _column(
        hidden,
        {"q": (heads * d, r * heads * d), "k": (kv_heads * d, kv_first * d),
         "v": (kv_heads * d, kv_first * d)},
        bias,
    )  # fmt: skip
    a.o_proj = _row(heads * d, hidden, r * heads * d)
    a.num_heads, a.num_kv_heads = heads, kv_heads
    a.q_size, a.kv_size = heads * d, kv_heads * d
    a.reduce = tp.all_reduce


def shard_mlp(m: LlamaMLP, tp: TPGroup, reduce: bool) -> None:
    hidden = m.gate_up_proj.in_features
    inter = _divide("intermediate_size", m.down_proj.in_features, tp.size)
    start = tp.rank * inter
    m.gate_up_proj = _column(hidden, {0: (inter, start), 1: (inter, start)}, bias=False)
    m.down_proj = _row(inter, hidden, start)
    if reduce:
        m.reduce = tp.all_reduce


def shard_moe(
    b: SparseMoeBlock, tp: TPGroup, expert_parallel: bool, placement: ExpertPlacement | None
) -> None:
    """Slice every expert, or with ``expert_parallel`` hold whole experts: ``placement``'s
    (EPLB, saved), else a contiguous share."""
    e = b.experts
    hidden = e.w13.shape[2]
    if expert_parallel:
        placement = placement or ExpertPlacement.contiguous(e.num_experts, tp.size)
        if placement.num_experts != e.num_experts or len(placement.ranks) != tp.size:
            raise ValueError(
                f"the saved expert placement holds {placement.num_experts} experts on "
                f"{len(placement.ranks)} ranks; the model has {e.num_experts} on {tp.size}"
            )
        b.experts = Experts(e.num_experts, hidden, e.intermediate, placement.slots_per_rank)
        b.experts.place(placement, tp.rank)
    else:
        inter = _divide("moe_intermediate_size", e.intermediate, tp.size)
        b.experts = Experts(e.num_experts, hidden, inter)
        b.experts.inter_start = tp.rank * inter
    if b.shared_expert is not None:
        shard_mlp(b.shared_expert, tp, reduce=False)
    b.reduce = tp.all_reduce


def shard_model(
    model: LlamaForCausalLM,
    tp: TPGroup,
    expert_parallel: bool = False,
    placements: list[ExpertPlacement] | None = None,
) -> None:
    """Replace ``model``'s layers (on meta, weights not loaded yet) by this rank's shards;
    ``placements``: the experts of each sparse layer's ranks (expert parallelism)."""
    if getattr(model, "is_multimodal", False):
        raise ValueError("tensor parallelism is not supported for vision-language models")
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    if placements is not None and len(placements) != len(blocks):
        raise ValueError(
            f"the saved expert placement has {len(placements)} sparse layers; the model "
            f"has {len(blocks)}"
        )
    for module in list(model.modules()):
        if isinstance(module, LlamaAttention):
            shard_attention(module, tp)
    for i, block in enumerate(blocks):
        shard_moe(block, tp, expert_parallel, placements[i] if placements else None)
    shared = {id(b.shared_expert) for b in model.modules() if isinstance(b, SparseMoeBlock)}
    for module in list(model.modules()):
        if isinstance(module, LlamaMLP) and id(module) not in shared:
            shard_mlp(module, tp, reduce=True)
    vocab, hidden = model.vocab_size, model.lm_head.in_features
    per_rank = -(-vocab // tp.size)
    start = tp.rank * per_rank
    model.model.embed_tokens = VocabParallelEmbedding(vocab, per_rank, hidden, start, tp)
    _slice(model.model.embed_tokens, 0, start)
    model.lm_head = nn.Linear(hidden, per_rank, bias=False)
    _slice(model.lm_head, 0, start)
    model.gather_logits = tp.all_gather_last
