"""Paged attention behind one small interface.

The KV cache of a layer is two tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``.
A step's tokens are flattened: decode tokens first (one per sequence), then each prefill
chunk. ``slot_mapping`` says where each new token's K and V go (block * block_size + offset).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from services.engine.layers import native, prefill_kernel, short_chunks
from services.engine.layers.masks import additive_mask


@dataclass
class PrefillSegment:
    """One sequence's prefill chunk inside the flattened batch."""

    start: int  # first token of the chunk in the flattened batch
    num_tokens: int  # chunk length (queries)
    context_len: int  # tokens attended to: cached prefix + this chunk
    block_table: torch.Tensor  # [num_blocks] block ids of the sequence


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of every token computed this step
    num_decodes: int = 0  # tokens [0, num_decodes) are decodes, one per sequence
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks], padded with 0
    decode_context_lens: torch.Tensor | None = None  # [B]
    # [B, 1, 1, max_blocks * block_size]: 0 where a decode attends, -inf past its context
    # (a boolean mask, True where it attends, works the same)
    decode_mask: torch.Tensor | None = None
    decode_max_len: int = 0  # the longest context among the decodes
    prefills: list[PrefillSegment] = field(default_factory=list)
    # Called with the layer index once a layer's KV for this step is in the cache (KV push
    # overlaps the remaining layers' compute).
    on_layer_done: Callable[[int], None] | None = None
    # False for pooling batches: whole prompts, nothing kept (no slots, the cache untouched).
    write_kv: bool = True
    # The prefills grouped for batched attention (short_chunks.plan), made by the first layer.
    chunk_plan: tuple[list[short_chunks.ChunkGroup], list[PrefillSegment]] | None = None
    # The decodes' and the groups' query rows for the CPU's paged kernel (short_chunks.paged_rows).
    native_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_stored: bool = False,  # the caller already wrote k and v into the caches
    ) -> torch.Tensor:  # [T, H, D]
        ...


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    hkv, d = k.shape[1], k.shape[2]
    k_cache.view(-1, hkv, d).index_copy_(0, slots, k)
    v_cache.view(-1, hkv, d).index_copy_(0, slots, v)


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[..., nb] block ids -> [..., nb * block_size, Hkv, D] contiguous keys or values."""
    # NOTE: index_select on dim 0 copies whole blocks (memcpy per block); advanced indexing
    # (``cache[block_table]``) goes through the generic element-wise index kernel, 3-5x
    # slower on CPU, which made this gather a fifth of a decode step. Same bytes out.
    g = cache.index_select(0, block_table.reshape(-1))
    return g.view(*block_table.shape[:-1], -1, cache.shape[2], cache.shape[3])


class TorchAttention:
    """Reference backend: runs on any torch device with scaled_dot_product_attention.

    Decodes are one batched call over gathered, padded blocks; each prefill chunk is one call
    (causal, offset by its cached prefix).
    """

    # Whether decodes read the block tables in place (no gathered copy, no padding mask).
    paged_decode = False

    def __init__(self, device: torch.device | None = None) -> None:
        # On the CPU (a device given): the C kernel that reads the paged cache in place
        # (native.py), when it builds here; the decodes then need no padding mask either.
        cpu = device is not None and device.type == "cpu"
        self.native_decode = native.paged_decode() if cpu else None
        self.decode_mask_needed = self.native_decode is None

    def forward(
        self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
        kv_stored: bool = False,
    ):  # fmt: skip
        if meta.write_kv and not kv_stored:
            self.store(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if self.native_decode is not None and meta.prefills and meta.write_kv:
            self.native_rows(q, k, v, k_cache, v_cache, meta, scale, out)
            return out
        if meta.num_decodes:
            self.decode(q[: meta.num_decodes], k_cache, v_cache, meta, scale, out)
        self.prefill(q, k, v, k_cache, v_cache, meta, scale, out)
        return out

    def native_rows(self, q, k, v, k_cache, v_cache, meta, scale: float, out) -> None:
        """The decodes and the short chunks (speculative verifications) in ONE call of the
        paged C kernel, a decode row per query row, as the Triton backend does
        (``paged_chunks``); longer chunks as ``prefill`` does.

        NOTE: the grouped SDPA path gathers each verifying sequence's context and builds a
        mask, per group and layer: at batch 8 on 2 cores one sequence verifying one draft made
        the step 1.18x a decode step, which no acceptance repaid (chat ran at 0.88x the CPU
        per token of no speculation). A kernel call per group still cost an OpenMP region a
        layer each; in one call a query row costs what a decode row costs."""
        if meta.chunk_plan is None:
            meta.chunk_plan = short_chunks.plan(meta.prefills, k_cache.shape[1], q.device)
        groups, rest = meta.chunk_plan
        kernel = self.native_decode
        assert kernel is not None
        if meta.num_decodes or groups:
            if meta.native_rows is None:
                meta.native_rows = short_chunks.paged_rows(
                    groups, meta.num_decodes, meta.decode_block_tables, meta.decode_context_lens
                )
            rows, tables, lens, max_len = meta.native_rows
            qq = q.index_select(0, rows)  # [R, H, D], contiguous
            o = torch.empty_like(qq)
            if not kernel.usable(qq, k_cache, v_cache, o):  # not float32: the torch paths
                if meta.num_decodes:
                    self.decode(q[: meta.num_decodes], k_cache, v_cache, meta, scale, out)
                self.prefill(q, k, v, k_cache, v_cache, meta, scale, out)
                return
            kernel(qq, k_cache, v_cache, tables, lens, max_len, scale, o)
            out.index_copy_(0, rows, o)
        if rest:
            meta.chunk_plan = ([], rest)
            try:
                self.prefill(q, k, v, k_cache, v_cache, meta, scale, out)
            finally:
                meta.chunk_plan = (groups, rest)

    @staticmethod
    def store(k, v, k_cache, v_cache, slots: torch.Tensor) -> None:
        store_kv(k, v, k_cache, v_cache, slots)

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
        """The decodes (one query each): the C kernel over the paged cache in place where it
        is built (float32 on the CPU), else one batched SDPA call over gathered, padded blocks.

        The query heads that share a KV head are that head's queries: ``[B, Hkv, H/Hkv, D]``
        against ``[B, Hkv, L, D]`` (query head ``i`` reads KV head ``i // (H/Hkv)``, as
        transformers' ``repeat_kv``). SDPA's ``enable_gqa`` would copy K and V once per query
        head of the group instead.
        """
        assert meta.decode_block_tables is not None
        kernel = self.native_decode
        if kernel is not None and not q.is_contiguous():
            # NOTE: rotary in place (cpu_fused) leaves q a view into the qkv output; the
            # kernel wants [B, H, D] rows (a copy of B x H x D floats, not of the context).
            q = q.contiguous()
        if (
            kernel is not None
            and meta.decode_max_len
            and kernel.usable(q, k_cache, v_cache, out[: q.shape[0]])
        ):
            assert meta.decode_context_lens is not None
            b = q.shape[0]
            kernel(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                   meta.decode_max_len, scale, out[:b])  # fmt: skip
            return
        b, h, d = q.shape
        hkv = k_cache.shape[2]
        kk = gather_blocks(k_cache, meta.decode_block_tables).transpose(1, 2)
        vv = gather_blocks(v_cache, meta.decode_block_tables).transpose(1, 2)
        mask = meta.decode_mask
        if mask is None:  # metadata built for the kernel
            assert meta.decode_context_lens is not None
            mask = additive_mask(meta.decode_context_lens, kk.shape[2], q.dtype)[:, None, None]
        o = F.scaled_dot_product_attention(
            q.view(b, hkv, h // hkv, d), kk, vv, attn_mask=mask, scale=scale
        )
        out[:b] = o.view(b, h, d)

    @staticmethod
    def prefill(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
        """Each prefill chunk: one causal call, offset by its cached prefix; short chunks of
        equal length (speculative verifications) one call per length (``short_chunks``)."""
        if not meta.prefills:
            return
        if meta.chunk_plan is None:
            # Without a KV write (pooling) the chunks' keys are not in the cache to be gathered.
            meta.chunk_plan = (
                short_chunks.plan(meta.prefills, k_cache.shape[1], q.device)
                if meta.write_kv
                else ([], meta.prefills)
            )
        groups, rest = meta.chunk_plan
        for group in groups:
            kk = gather_blocks(k_cache, group.tables)
            vv = gather_blocks(v_cache, group.tables)
            short_chunks.attend(group, q, kk, vv, scale, out)
        fresh = [(s.start, s.num_tokens) for s in rest if s.context_len == s.num_tokens]
        kernel = prefill_kernel.prefill_attention() if fresh and q.device.type == "cpu" else None
        if kernel is not None and kernel.usable(q, k, v, out):
            # NOTE: all fresh prompts, of any lengths, in one call (csrc/prefill_attn.c: ~3x
            # SDPA's flash kernel at the offline benchmark's 128-token prompts).
            kernel(q, k, v, fresh, scale, out)
            fresh = []
        for run in _fresh_runs(rest) if fresh else []:
            # Whole prompts of one length side by side: one causal call over their new K/V.
            s, n, m = run[0].start, run[0].num_tokens, len(run)
            qq, kk, vv = (x[s : s + m * n].unflatten(0, (m, n)).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(
                qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True
            )
            out[s : s + m * n] = o.transpose(1, 2).flatten(0, 1)
        for seg in rest:
            if seg.context_len == seg.num_tokens:
                continue  # done above
            # A chunk after a cached prefix: its keys and values are gathered from the cache.
            s, n, ctx = seg.start, seg.num_tokens, seg.context_len
            qq = q[s : s + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            kk = gather_blocks(k_cache, seg.block_table)[:ctx].transpose(0, 1).unsqueeze(0)
            vv = gather_blocks(v_cache, seg.block_table)[:ctx].transpose(0, 1).unsqueeze(0)
            qpos = torch.arange(ctx - n, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True
            )
            out[s : s + n] = o.squeeze(0).transpose(0, 1)


def _fresh_runs(segments: list[PrefillSegment]) -> list[list[PrefillSegment]]:
    """The chunks without a cached prefix (``context_len == num_tokens``: they attend to their
    own new K/V only), in runs of one length that lie back to back in the flattened batch.

    NOTE: one call per run instead of one per prompt: a 1,024-token prefill step of the
    offline benchmark is 8 prompts of 128: one call a layer instead of 8 (the batch
    dimension also splits better over the threads than 9 heads do). The flash kernel computes
    each (sequence, head) alone, so the values are the one-by-one call's."""
    runs: list[list[PrefillSegment]] = []
    for seg in segments:
        if seg.context_len != seg.num_tokens:
            continue
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and last.num_tokens == seg.num_tokens
            and last.start + last.num_tokens == seg.start
        ):
            runs[-1].append(seg)
        else:
            runs.append([seg])
    return runs
