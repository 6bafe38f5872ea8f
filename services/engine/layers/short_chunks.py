"""Short chunks over a cached context, batched: one attention call for many sequences.

A speculative verification is a chunk of 1 + k query tokens per sequence over that
sequence's cached context; a slow prompt under a small step budget can be a short chunk too.
Run one by one, each costs a gather and an SDPA call per layer, which made a verification
step of 8 sequences cost more than the decodes it replaces. Chunks of the same length are one
call here, the way decodes are (``TorchAttention.decode``), with the causal limit of each
query row in a mask built once per step and shared by every layer.

Query rows are laid out per KV head as ``[group member, chunk position]``:
``q[S, n, H, D] -> [S, Hkv, (H/Hkv) * n, D]``, so that each KV head's queries are one block
(query head ``i`` reads KV head ``i // (H/Hkv)``, as transformers' ``repeat_kv``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine.layers.masks import additive_mask

# Chunks up to this many tokens are batched (a verification is 1 + k, k <= 32; prompts are
# longer).
MAX_TOKENS = 33


@dataclass
class ChunkGroup:
    """Chunks of ``n`` tokens each, of ``len(tables)`` sequences."""

    n: int
    rows: torch.Tensor  # [S * n] rows of the chunks' tokens in the flattened batch
    tables: torch.Tensor  # [S, max_blocks] block ids, padded with 0
    limits: torch.Tensor  # [S, n] how many context tokens each query row attends to
    mask: torch.Tensor | None = None  # [S, 1, g * n, L] additive, built at first use
    # Per query row: its sequence's block table and its limit, int32 (the Triton backend's
    # paged kernel reads them; built at first use).
    paged: tuple[torch.Tensor, torch.Tensor] | None = None


def plan(segments: list, block_size: int, device: torch.device) -> tuple[list[ChunkGroup], list]:
    """Split prefill segments into groups of equal short length and the rest, which run one
    by one. A lone short chunk over a cached context is a group too: a batch-1 verification
    of 16 drafts took 52 ms there against 58 one by one (a 30 ms decode step; the one-by-one
    call builds its mask in every layer and repeats each KV head for its query heads); a
    lone chunk without a cached context keeps the one-by-one call, which reads its keys
    without a gather."""
    by_len: dict[int, list] = {}
    rest = []
    for seg in segments:
        if seg.num_tokens <= MAX_TOKENS:
            by_len.setdefault(seg.num_tokens, []).append(seg)
        else:
            rest.append(seg)
    groups = []
    for n, segs in by_len.items():
        if len(segs) < 2 and segs[0].context_len == n:
            rest.extend(segs)
            continue
        width = max((s.context_len + block_size - 1) // block_size for s in segs)
        tables = torch.zeros(len(segs), width, dtype=torch.long, device=device)
        for i, s in enumerate(segs):
            blocks = s.block_table[: (s.context_len + block_size - 1) // block_size]
            tables[i, : blocks.shape[0]] = blocks
        rows = torch.tensor(
            [s.start + j for s in segs for j in range(n)], dtype=torch.long, device=device
        )
        ctx = torch.tensor([s.context_len for s in segs], dtype=torch.long, device=device)
        # Row j of a chunk is position ctx - n + j: it sees the context up to and including it.
        limits = ctx[:, None] - n + 1 + torch.arange(n, device=device)[None, :]
        groups.append(ChunkGroup(n, rows, tables, limits))
    rest.sort(key=lambda s: s.start)
    return groups, rest


def paged_rows(
    groups: list[ChunkGroup],
    num_decodes: int,
    decode_tables: torch.Tensor | None,
    decode_lens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The decodes' rows (the first ``num_decodes`` of the batch) and every query row of
    ``groups`` as decode rows of one paged kernel call: (rows in the flattened batch, each
    row's block table padded with 0, how many context tokens it attends to, the most),
    int64, built once a step for every layer."""
    parts_rows, parts_lens, widths = [], [], []
    if num_decodes:
        assert decode_tables is not None and decode_lens is not None
        device = decode_tables.device
        parts_rows.append(torch.arange(num_decodes, device=device))
        parts_lens.append(decode_lens.to(torch.long))
        widths.append(decode_tables.shape[1])
    for g in groups:
        parts_rows.append(g.rows)
        parts_lens.append(g.limits.reshape(-1))
        widths.append(g.tables.shape[1])
    rows, lens = torch.cat(parts_rows), torch.cat(parts_lens)
    tables = torch.zeros(rows.shape[0], max(widths), dtype=torch.long, device=rows.device)
    at = 0
    if num_decodes:
        assert decode_tables is not None
        tables[:num_decodes, : decode_tables.shape[1]] = decode_tables
        at = num_decodes
    for g in groups:
        m = g.rows.shape[0]
        tables[at : at + m, : g.tables.shape[1]] = g.tables.repeat_interleave(g.n, dim=0)
        at += m
    return rows, tables, lens, int(lens.max())


def attend(
    group: ChunkGroup,
    q: torch.Tensor,
    kk: torch.Tensor,
    vv: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """One SDPA call for every chunk of ``group`` over its sequences' gathered blocks
    (``kk``, ``vv``: ``[S, L, Hkv, D]``); writes its rows of ``out``."""
    s, n = group.tables.shape[0], group.n
    h, d = q.shape[1], q.shape[2]
    hkv = kk.shape[2]
    g = h // hkv
    span = kk.shape[1]
    if group.mask is None:
        mask = additive_mask(group.limits, span, q.dtype)  # [S, n, L]
        group.mask = mask[:, None, None].expand(s, 1, g, n, span).reshape(s, 1, g * n, span)
    qq = q.index_select(0, group.rows).view(s, n, hkv, g, d).permute(0, 2, 3, 1, 4)
    o = F.scaled_dot_product_attention(
        qq.reshape(s, hkv, g * n, d),
        kk.transpose(1, 2),
        vv.transpose(1, 2),
        attn_mask=group.mask,
        scale=scale,
    )
    o = o.view(s, hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(s * n, h, d)
    out.index_copy_(0, group.rows, o)
