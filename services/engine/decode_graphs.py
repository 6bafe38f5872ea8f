"""CUDA graphs of the model's forward for decode-only batches (one per batch size)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from services.engine.layers import fused
from services.engine.layers.attention import AttentionMetadata
from services.engine.layers.moe import Experts

logger = logging.getLogger(__name__)


def capture_blocker(model: torch.nn.Module) -> str | None:
    """Why ``model``'s decode forward cannot be captured in a CUDA graph (None: it can)."""
    if fused.moe is None and any(isinstance(m, Experts) for m in model.modules()):
        # NOTE: the fused Triton experts keep every count on the device; the reference reads
        # them on the host (``.tolist()``: a sync, which a capture refuses).
        return "the reference MoE experts read their token counts on the host (no fused MoE)"
    return None


class DecodeGraphs:
    """CUDA graphs of the model's forward for decode-only batches.

    One graph per batch size in ``sizes`` (1, 2, 4, 8, then every 16 up to ``max_num_seqs``),
    captured largest first into one memory pool. A step of ``n`` decodes replays the smallest
    graph of at least ``n`` rows; the padding rows have slot -1 (their KV is not written) and
    context length 0 (their attention output is 0), and their logits are never computed.
    Inputs go through static tensors; the kernels take every length from them.
    """

    def __init__(self, runner: Any, max_num_seqs: int) -> None:
        self.runner = runner
        dev = runner.device
        # Vision-language models take M-RoPE positions [3, T] (a decode step has no images).
        self.mrope = bool(getattr(runner.model, "is_multimodal", False))
        self.sizes = sorted({n for n in (1, 2, 4, 8, *range(16, max_num_seqs + 16, 16))
                             if n <= max_num_seqs} | {max_num_seqs})  # fmt: skip
        n_max = self.sizes[-1]
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.ids = torch.zeros(n_max, dtype=torch.long, device=dev)
        pos_shape = (3, n_max) if self.mrope else (n_max,)
        self.positions = torch.zeros(pos_shape, dtype=torch.long, device=dev)
        self.slots = torch.full((n_max,), -1, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n_max, self.max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(n_max, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for n in reversed(self.sizes):
                meta = self._meta(n)
                # The first call compiles the Triton kernels and warms cuBLAS: never in capture.
                runner.model(self.ids[:n], self.positions[..., :n], meta)
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = runner.model(self.ids[:n], self.positions[..., :n], meta)
                self.graphs[n] = (graph, hidden)
        torch.cuda.synchronize(dev)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def _meta(self, n: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:n],
            num_decodes=n,
            decode_block_tables=self.tables[:n],
            decode_context_lens=self.lens[:n],
        )

    def run(
        self,
        ids: list[int],
        positions: torch.Tensor,  # [B], or [3, B] for M-RoPE
        slots: list[int],
        tables: list[list[int]],
        lens: list[int],
    ) -> torch.Tensor | None:
        """Hidden states of the decodes [len(ids), hidden], or None when no graph fits."""
        b = len(ids)
        width = len(tables[0])
        if b > self.sizes[-1] or width > self.max_blocks:
            return None
        n = next(size for size in self.sizes if size >= b)
        pad = n - b
        self.ids[:b].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        self.positions[..., :b].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(torch.tensor(slots + [-1] * pad, dtype=torch.long), non_blocking=True)
        self.lens[:n].copy_(torch.tensor(lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        self.tables[:b, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        graph, hidden = self.graphs[n]
        graph.replay()
        return hidden[:b]
