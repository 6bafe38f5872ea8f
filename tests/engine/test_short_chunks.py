"""Short prefill chunks of equal length attend in one batched call (speculative verification)
with the same result as one call per chunk."""

from __future__ import annotations

import pytest
import torch

from services.engine.layers import native, short_chunks
from services.engine.layers.attention import AttentionMetadata, PrefillSegment, TorchAttention

BS, HKV, G, D = 4, 2, 3, 8


def _step(chunks: list[tuple[int, int]], seed: int = 0):
    """Random cache and queries for prefill chunks given as (num_tokens, context_len)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k_cache = torch.randn(num_blocks, BS, HKV, D, generator=gen)
    v_cache = torch.randn(num_blocks, BS, HKV, D, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    segments, start = [], 0
    for n, ctx in chunks:
        nb = (ctx + BS - 1) // BS
        table = torch.tensor([free.pop() for _ in range(nb + 1)])  # one spare block, as lookahead
        segments.append(PrefillSegment(start, n, ctx, table))
        start += n
    q = torch.randn(start, HKV * G, D, generator=gen)
    return q, k_cache, v_cache, segments


def _chunk_kv(cache: torch.Tensor, segments: list[PrefillSegment]) -> torch.Tensor:
    """The chunks' own keys or values, as the step computed them (already in the cache)."""
    rows = [
        cache[seg.block_table[p // BS], p % BS]
        for seg in segments
        for p in range(seg.context_len - seg.num_tokens, seg.context_len)
    ]
    return torch.stack(rows)


def _run(q, k_cache, v_cache, segments, grouped: bool) -> torch.Tensor:
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), prefills=segments)
    if not grouped:
        meta.chunk_plan = ([], list(segments))
    out = torch.full_like(q, float("nan"))
    k, v = _chunk_kv(k_cache, segments), _chunk_kv(v_cache, segments)
    TorchAttention.prefill(q, k, v, k_cache, v_cache, meta, D**-0.5, out)
    return out


def test_grouped_chunks_equal_one_call_each():
    # Four lengths: 5 (three sequences), 2 (two), 1 (alone over a cached context: a batch-1
    # verification); a long chunk and a lone one without a cached context are not grouped.
    # Contexts cross block boundaries and differ within a group.
    chunks = [(5, 9), (2, 2), (5, 17), (40, 43), (1, 6), (5, 5), (2, 11), (3, 3)]
    q, kc, vc, segs = _step(chunks)
    groups, rest = short_chunks.plan(segs, BS, q.device)
    assert sorted(g.n for g in groups) == [1, 2, 5]
    assert sorted(s.num_tokens for s in rest) == [3, 40]
    grouped = _run(q, kc, vc, segs, grouped=True)
    single = _run(q, kc, vc, segs, grouped=False)
    assert not grouped.isnan().any()
    torch.testing.assert_close(grouped, single, rtol=1e-5, atol=1e-6)


def test_causal_limit_inside_a_chunk():
    # The last context token of a chunk's first row is its own: changing a later row's key
    # must not change the earlier rows' output.
    q, kc, vc, segs = _step([(4, 10), (4, 12)], seed=1)
    before = _run(q, kc, vc, segs, grouped=True)
    seg = segs[0]
    last = seg.context_len - 1  # the chunk's last token
    kc[seg.block_table[last // BS], last % BS] += 5.0
    after = _run(q, kc, vc, segs, grouped=True)
    torch.testing.assert_close(after[: seg.num_tokens - 1], before[: seg.num_tokens - 1])
    assert not torch.allclose(after[seg.num_tokens - 1], before[seg.num_tokens - 1])
    torch.testing.assert_close(after[seg.num_tokens :], before[seg.num_tokens :])


def test_cpu_kernel_takes_the_decodes_and_grouped_chunks_in_one_call():
    """On the CPU the decodes and every short chunk's query rows go through ONE call of the
    paged C kernel (the grouped SDPA call's gather and mask made one verifying sequence cost
    0.18 of a batch-8 decode step); the result equals the decode path and one SDPA call per
    chunk, and the other chunks keep SDPA."""
    kernel = native.paged_decode()
    if kernel is None:
        pytest.skip("no C compiler: the kernel is not built here")
    decode_lens = [7, 13, 1]
    chunks = [(1, n) for n in decode_lens]  # the decodes, first in the batch
    chunks += [(5, 9), (2, 2), (5, 17), (40, 43), (1, 6), (5, 5), (2, 11), (3, 3)]
    q, kc, vc, segs = _step(chunks)
    k, v = _chunk_kv(kc, segs), _chunk_kv(vc, segs)  # every row's, the decodes' first
    decodes, segs = segs[:3], segs[3:]
    width = max(s.block_table.shape[0] for s in decodes)
    tables = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(decodes):
        tables[i, : s.block_table.shape[0]] = s.block_table
    calls = []

    class Counting:
        usable = staticmethod(kernel.usable)

        def __call__(self, q, *args):
            calls.append(q.shape[0])
            kernel(q, *args)

    backend = TorchAttention(torch.device("cpu"))
    backend.native_decode = Counting()
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decodes=3,
                             decode_block_tables=tables,
                             decode_context_lens=torch.tensor(decode_lens),
                             decode_max_len=max(decode_lens), prefills=segs)  # fmt: skip
    out = torch.full_like(q, float("nan"))
    backend.native_rows(q, k, v, kc, vc, meta, D**-0.5, out)
    assert calls == [3 + 1 + 2 * 2 + 3 * 5]  # one call: the decodes and the groups' rows
    assert not out.isnan().any()
    ref = torch.full_like(q, float("nan"))
    meta_ref = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decodes=3,
                                 decode_block_tables=tables,
                                 decode_context_lens=torch.tensor(decode_lens),
                                 decode_max_len=max(decode_lens))  # fmt: skip
    TorchAttention().decode(q[:3], kc, vc, meta_ref, D**-0.5, ref)
    shifted = [PrefillSegment(s.start - 3, s.num_tokens, s.context_len, s.block_table)
               for s in segs]  # fmt: skip
    ref[3:] = _run(q[3:], kc, vc, shifted, grouped=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
