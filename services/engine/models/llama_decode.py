"""A Llama decoder layer's decode step on the CPU: the same kernels, less Python around them.

At decode batch 16 a layer's own Python (eight ``nn.Module`` calls, the fused kernels' shape
checks, the CUDA/CPU dispatch tests) is serial time on the step thread, in which the OpenMP
thread has nothing to do (under ``OMP_WAIT_POLICY=PASSIVE`` it sleeps and is woken again for
the next linear). What holds for the whole step (a decode-only batch of float32 rows, int64
positions, the paged C kernel usable on the cache) is checked once a step here; each layer
then calls the very kernels ``LlamaDecoderLayer.forward`` calls, with the same arguments in
the same order, so the hidden states are bit for bit the same
(tests/engine/test_llama_decode.py). It took ~1.4 ms of step-thread CPU off a 30-layer decode
step at batch 16 (benchmarks/decode_path_ab.py). The rotary embedding, the KV write and the
paged attention of a layer are one C call (``PagedDecode.rotary_store_attend``: the same
arithmetic as ``CpuFused.rotary_store_`` and the kernel, read from the qkv output in place).

Layers it does not cover keep their module call: a layer with forward pre-hooks (EAGLE-3
reads some layers' inputs), a mixture-of-experts MLP, q/k norms (Qwen3), a rotary other than
``RotaryEmbedding`` (M-RoPE). ``EPDSERVE_CPU_DECODE_PATH=0`` turns it off (to compare).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from services.engine.layers import cpu_fused, short_chunks
from services.engine.layers.attention import AttentionMetadata, TorchAttention
from services.engine.layers.rotary import RotaryEmbedding
from services.engine.models.llama import LlamaMLP


def _rows(x: torch.Tensor) -> bool:
    return (
        x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and x.is_contiguous()
    )


class Scratch:
    """The tensors a layer writes and reads back within itself (its normed inputs to the qkv
    and gate_up projections, its attention's output, its activation), one set of a step's
    row count for every layer of a path: each layer overwrites the last one's.

    NOTE: a fresh ``torch.empty`` for each was 4 of the 5 allocations a layer made, 120 a
    30-layer step (~1.5 us of step-thread CPU each at load ~20, in which the OpenMP thread
    has nothing to do: benchmarks/step_overhead.py --python). Nothing outside the layer sees
    these: its output (the residual sum) and its projections' outputs stay new tensors."""

    def __init__(self) -> None:
        self.rows = -1
        self._bufs: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, what: str, rows: int, width: int) -> torch.Tensor:
        """A contiguous float32 [rows, width] for ``what``; its contents are stale."""
        if rows != self.rows:  # a new batch size: the old tensors go
            self._bufs.clear()
            self.rows = rows
        buf = self._bufs.get((what, width))
        if buf is None:
            buf = self._bufs[what, width] = torch.empty((rows, width), dtype=torch.float32)
        return buf


class DecodeLayer:
    """One decoder layer's modules and tensors, held as plain attributes (no ``nn.Module``
    attribute lookups in the step)."""

    def __init__(self, layer: Any, ops: cpu_fused.CpuFused, scratch: Scratch | None = None) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.layer = layer
        self.scratch = scratch or Scratch()
        self.attn = attn
        self.ops = ops
        self.qkv, self.o_proj = attn.qkv_proj, attn.o_proj
        self.mlp = mlp
        self.gate_up, self.down = mlp.gate_up_proj, mlp.down_proj
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.w_in, self.w_post = self.in_norm.weight, self.post_norm.weight
        self.sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.kernel = attn.backend.native_decode
        # A decode batch's rotary, KV write and attention in one C call (False: the two calls,
        # ``benchmarks/decode_path_ab.py --compare fused``).
        self.fuse = True

    def hooked(self) -> bool:
        """A hook set on the layer since (EAGLE-3 sets one on some layers' inputs)."""
        return bool(self.layer._forward_pre_hooks or self.layer._forward_hooks)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # fmt: skip
        """``LlamaDecoderLayer.forward`` of a decode-only batch (``DecodePath.usable``)."""
        ops, a, t, scratch = self.ops, self.attn, x.shape[0], self.scratch
        # LlamaAttention.forward, LlamaMLP.forward and the backend's decode, inlined.
        h = ops.rms_norm(x, self.w_in, self.in_norm.eps, out=scratch.get("norm", *x.shape))[1]
        qkv = self.qkv.forward(h)
        assert self.kernel is not None
        contiguous = qkv.is_contiguous()  # the heads' rows as the kernels want them
        if contiguous and self.fuse and not meta.prefills:  # a decode batch: one C call
            out = scratch.get("attn", t, a.q_size)
            self.kernel.rotary_store_attend(
                positions, qkv, self.heads, rotary.cos, rotary.sin, a.k_cache, a.v_cache,
                meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens,
                meta.decode_max_len, a.scale, out,
            )  # fmt: skip
            return self._mlp(x, a.reduce(self.o_proj.forward(out)))
        q, k, v = qkv.split(self.sizes, dim=-1)
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        if contiguous:
            ops.rotary_store_(positions, q, k, v, rotary.cos, rotary.sin, a.k_cache, a.v_cache,
                              meta.slot_mapping)  # fmt: skip
        else:
            q, k = rotary(positions, q, k)
            TorchAttention.store(k, v, a.k_cache, a.v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if (
            meta.prefills
        ):  # verifications: every query row a decode row (TorchAttention.native_rows)
            assert meta.native_rows is not None
            rows, tables, lens, max_len = meta.native_rows
            qq = q.index_select(0, rows)
            o = torch.empty_like(qq)
            self.kernel(qq, a.k_cache, a.v_cache, tables, lens, max_len, a.scale, o)
            out.index_copy_(0, rows, o)
        else:
            assert meta.decode_block_tables is not None
            self.kernel(q.contiguous(), a.k_cache, a.v_cache, meta.decode_block_tables,
                        meta.decode_context_lens, meta.decode_max_len, a.scale, out)  # fmt: skip
        attn = a.reduce(self.o_proj.forward(out.reshape(t, a.q_size)))
        return self._mlp(x, attn)

    def _mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual add, the post-attention norm, the MLP and its residual add."""
        ops, scratch = self.ops, self.scratch
        x, h = ops.rms_norm(x, self.w_post, self.post_norm.eps, attn, scratch.get("norm", *x.shape))
        gate_up = self.gate_up.forward(h)
        if ops.silu_vectorized and cpu_fused.rows(gate_up) and gate_up.shape[1] % 2 == 0:
            act = ops.silu_mul(gate_up, scratch.get("act", gate_up.shape[0], gate_up.shape[1] // 2))
        else:  # LlamaMLP's torch path (AVX2 builds: see cpu_fused)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate).mul_(up)
        return ops.add_(x, self.mlp.reduce(self.down.forward(act)))


class DecodePath:
    """The decode-step path of a ``LlamaModel``'s eligible layers; ``None`` in ``layers`` for
    a layer that keeps its module call."""

    def __init__(self, layers: list[DecodeLayer | None], rotary: RotaryEmbedding) -> None:
        self.layers = layers
        self.rotary = rotary
        self.steps = 0  # forward passes that took this path (tests, benchmarks)

    @classmethod
    def build(cls, model: Any) -> DecodePath | None:
        """For ``model`` (a ``LlamaModel``) on the CPU in float32 with the fused kernels and
        the paged decode kernel; None where no layer qualifies or it is switched off."""
        ops = cpu_fused.ops()
        rotary = getattr(model, "rotary", None)
        if (
            os.environ.get("EPDSERVE_CPU_DECODE_PATH", "1") == "0"
            or ops is None
            or type(rotary) is not RotaryEmbedding
            or rotary.cos.device.type != "cpu"
            or rotary.cos.dtype != torch.float32
        ):
            return None
        layers: list[DecodeLayer | None] = []
        scratch = Scratch()  # shared by the layers
        for layer in model.layers:
            attn = getattr(layer, "self_attn", None)
            kernel = getattr(getattr(attn, "backend", None), "native_decode", None)
            ok = (
                type(getattr(layer, "mlp", None)) is LlamaMLP
                and attn is not None
                and not attn.qk_norm
                and type(attn.backend) is TorchAttention  # not a subclass (Triton)
                and kernel is not None
                and kernel.usable(attn.k_cache[:0], attn.k_cache, attn.v_cache, attn.k_cache[:0])
                and tuple(attn.k_cache.shape[-2:]) == (attn.num_kv_heads, attn.head_dim)
                and attn.k_cache.shape == attn.v_cache.shape
                and all(ops.norm_usable(n.weight[None], n.weight)
                        for n in (layer.input_layernorm, layer.post_attention_layernorm))
            )  # fmt: skip
            layers.append(DecodeLayer(layer, ops, scratch) if ok else None)
        if not any(layers):
            return None
        return cls(layers, rotary)

    def usable(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this forward pass is a batch the path covers (once a step): decodes, and
        speculative verifications whose query rows all run as decode rows of the paged kernel
        (short chunks, ``TorchAttention.native_rows``: the same call, the same tables)."""
        t = x.shape[0]
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        if meta.prefills:
            if not self._rows_cover(t, meta):
                return False
        elif not (
            meta.num_decodes == t > 0
            and meta.decode_max_len > 0
            and tables is not None
            and lens is not None
            # what PagedDecode.rotary_store_attend takes as it is
            and tables.dtype == lens.dtype == torch.int64
            and tables.device.type == lens.device.type == "cpu"
            and tables.is_contiguous()
            and lens.is_contiguous()
            and self.rotary.cos.is_contiguous()
            and self.rotary.sin.is_contiguous()
        ):
            return False
        return (
            meta.write_kv
            and t > 0
            and _rows(x)
            and meta.slot_mapping.dtype == torch.int64
            and meta.slot_mapping.device.type == "cpu"
            and meta.slot_mapping.numel() == t
            and positions.dim() == 1
            and positions.numel() == t
            and positions.dtype == torch.int64
            and positions.device.type == "cpu"
            and positions.is_contiguous()
        )

    def _rows_cover(self, t: int, meta: AttentionMetadata) -> bool:
        """Whether the step's chunks are all short (grouped, no chunk run on its own) so
        that its ``t`` query rows are decode rows of one kernel call; builds the step's plan
        and rows as ``TorchAttention.native_rows`` would (NOTE: once a step, for every layer
        either path takes)."""
        layer = next(d for d in self.layers if d is not None)
        if meta.chunk_plan is None:
            block_size = layer.attn.k_cache.shape[1]
            meta.chunk_plan = short_chunks.plan(meta.prefills, block_size, torch.device("cpu"))
        groups, rest = meta.chunk_plan
        if rest or not groups:
            return False
        if meta.native_rows is None:
            meta.native_rows = short_chunks.paged_rows(
                groups, meta.num_decodes, meta.decode_block_tables, meta.decode_context_lens
            )
        return meta.native_rows[0].numel() == t
