"""The sparse mixture-of-experts block and the loading of per-expert checkpoint tensors,
shared by the MoE families (Qwen2-MoE, Qwen3-MoE, Mixtral) on the Llama decoder.

Checkpoints name each expert's projections apart (``mlp.experts.3.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.3.w1.weight``); they are copied into the fused expert
tensors of ``layers/moe.Experts``. Everything else loads as in the dense model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.eplb import ExpertPlacement
from services.engine.layers.moe import Experts, route
from services.engine.models.llama import LlamaForCausalLM, LlamaMLP

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


class SparseMoeBlock(nn.Module):
    """Router (``gate``), routed experts and, for Qwen2-MoE, a shared expert scaled by the
    sigmoid of its own one-output gate."""

    def __init__(
        self,
        cfg: Any,
        num_experts: int,
        intermediate: int,
        renormalize: bool,
        shared_intermediate: int = 0,
    ) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = renormalize
        self.gate = nn.Linear(cfg.hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, cfg.hidden_size, intermediate)
        self.shared_expert: LlamaMLP | None = None
        if shared_intermediate:
            self.shared_expert = LlamaMLP(cfg, shared_intermediate)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        # Tokens routed to each expert so far (made on the first forward, on its device;
        # with CUDA graphs, padding rows count too).
        self.expert_tokens: torch.Tensor | None = None
        # Sum of the ranks' partial outputs under tensor/expert parallelism (tp_shard.py).
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        flat = ids.reshape(-1)
        if self.expert_tokens is None or self.expert_tokens.device != flat.device:
            self.expert_tokens = torch.zeros(self.gate.out_features, dtype=torch.long,
                                             device=flat.device)  # fmt: skip
        self.expert_tokens.index_add_(0, flat, torch.ones_like(flat))
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.reduce(out)


def is_sparse_layer(cfg: Any, layer: int) -> bool:
    """Qwen-MoE's rule: a layer is sparse unless listed in ``mlp_only_layers`` or off the
    ``decoder_sparse_step`` stride."""
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return layer not in (getattr(cfg, "mlp_only_layers", None) or []) and (layer + 1) % step == 0


class MoeForCausalLM(LlamaForCausalLM):
    """A Llama-shaped decoder whose feed-forward blocks are (some of them) sparse MoE."""

    # Checkpoint name fragment -> this model's (e.g. Mixtral's block_sparse_moe -> mlp).
    renamed: dict[str, str] = {}
    # Checkpoint name of an expert projection -> gate, up or down.
    expert_parts = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    @property
    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        modules = dict(self.named_modules())
        loaded: set[tuple[str, int, str]] = set()
        super().load_weights(self._split_experts(weights, modules, loaded))
        expected = {
            (path, e, part)
            for path, m in modules.items()
            if isinstance(m, Experts)
            for e in range(m.num_experts)
            for part in ("gate", "up", "down")
        }
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing expert tensors: {sorted(missing)[:4]}")

    def place_experts(
        self, placements: list[ExpertPlacement], rank: int,
        weights: Iterable[tuple[str, torch.Tensor]],
    ) -> None:  # fmt: skip
        """Hold, in each sparse layer, the experts ``placements[layer]`` gives ``rank``
        (expert parallelism), their weights read again from ``weights``."""
        blocks = self.moe_blocks
        if len(placements) != len(blocks):
            raise ValueError(f"{len(placements)} placements for {len(blocks)} sparse layers")
        for block, placement in zip(blocks, placements, strict=True):
            old = block.experts
            new = Experts(old.num_experts, old.w13.shape[2], old.intermediate,
                          placement.slots_per_rank)  # fmt: skip
            block.experts = new.to(old.w13.device, old.w13.dtype)
            block.experts.place(placement, rank)
        for _ in self._split_experts(weights, dict(self.named_modules()), set()):
            pass  # only the experts are read again

    def _split_experts(
        self,
        items: Iterable[tuple[str, torch.Tensor]],
        modules: dict[str, nn.Module],
        loaded: set[tuple[str, int, str]],
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Load the expert tensors of ``items`` (recorded in ``loaded``), yield the others."""
        for name, tensor in items:
            for src, dst in self.renamed.items():
                name = name.replace(src, dst)
            match = _EXPERT.match(name)
            if match is None:
                yield name, tensor
                continue
            path, expert, proj = match[1], int(match[2]), match[3]
            experts = modules.get(path)
            part = self.expert_parts.get(proj)
            if not isinstance(experts, Experts) or part is None:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
            if expert >= experts.num_experts:
                raise ValueError(f"checkpoint tensor {name!r}: no expert {expert}")
            self.load_expert(experts, expert, part, tensor, name)
            loaded.add((path, expert, part))

    def load_expert(
        self, experts: Experts, expert: int, part: str, tensor: torch.Tensor, name: str
    ) -> None:
        for dst in experts.expert_tensors(expert, part):
            if dst.shape != tensor.shape:  # this rank's slice of the expert
                dim = 1 if part == "down" else 0
                tensor = tensor.narrow(dim, experts.inter_start, dst.shape[dim])
            self._copy_expert(dst, tensor, name)

    @staticmethod
    def _copy_expert(dst: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
        if dst.shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
