/* Paged decode attention on the CPU: one query token per sequence, keys and values read in
 * place from the paged KV cache (no gathered copy, no padding).
 *
 * Built at run time by services/engine/layers/native.py with the host's instruction set
 * (-march=native: AVX-512 where the CPU has it, AVX2 elsewhere) and OpenMP; called through
 * ctypes. Plain C and no torch headers, so it builds in about a second.
 *
 * Layouts (float32, contiguous):
 *   q, out        [B, H, D]
 *   k/v cache     [num_blocks, block_size, Hkv, D]
 *   block_tables  [B, max_blocks] int64 (rows padded: only ceil(len / block_size) read;
 *                 each id read is checked against num_blocks)
 *   context_lens  [B] int64
 * Query head h reads KV head h / (H / Hkv), as transformers' repeat_kv.
 *
 * Per sequence (all its KV heads: a token's row of the cache is read whole), or per (sequence,
 * KV head) when the sequences are too few to share out, the query heads are done together,
 * two passes over the context: scores (q . k * scale) into a scratch row, then softmax and
 * the weighted sum of values. The blocks of a sequence lie anywhere in the cache, so the
 * rows a few tokens ahead are prefetched. Sums run in float32 like SDPA's CPU kernels; the order of additions differs, so
 * results agree to fp32 rounding, not bit for bit.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "epd_exp.h"
#include "epd_rotary.h"

#define MAX_GROUP 64

/* exp(x - m) in place (every x <= m), returning the sum. */
static float exp_shift_sum(float *x, int64_t n, float m) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) {
        x[i] = epd_exp(x[i] - m);
        s += x[i];
    }
    return s;
}

/* A GCC vector of one register's floats: 16 with AVX-512, 8 otherwise (AVX2; a 16-float
 * vector there is split badly: 7x slower). Loads and stores through memcpy: the rows are
 * 4-byte aligned only. */
#ifdef __AVX512F__
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(4 * VW)));

static inline vf loadv(const float *p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void storev(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

/* The lane sums of VW vectors as one vector: lane i holds the sum of d[i]'s lanes. A
 * transposing tree (each level adds the halves of two vectors' lane groups side by side):
 * VW - 1 shuffle pairs and adds for VW dot products, where summing each vector alone took
 * four times as many. The tree leaves lane i with the input at bitrev(i), so the inputs are
 * taken in bit-reversed order. Each sum adds the same lanes in the same order as a halving
 * tree on one vector (halves, quarters, ...), so the scores are those of that order. */
#if VW == 16
static inline vf comb8(vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline vf comb4(vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
static inline vf comb2(vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
static inline vf comb1(vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
static inline vf lane_sums(const vf *d) {
    const vf a0 = comb8(d[0], d[8]), a1 = comb8(d[4], d[12]), a2 = comb8(d[2], d[10]),
             a3 = comb8(d[6], d[14]), a4 = comb8(d[1], d[9]), a5 = comb8(d[5], d[13]),
             a6 = comb8(d[3], d[11]), a7 = comb8(d[7], d[15]);
    const vf b0 = comb4(a0, a1), b1 = comb4(a2, a3), b2 = comb4(a4, a5), b3 = comb4(a6, a7);
    return comb1(comb2(b0, b1), comb2(b2, b3));
}
#else
static inline vf comb4(vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}
static inline vf comb2(vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
}
static inline vf comb1(vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
}
static inline vf lane_sums(const vf *d) {
    const vf a0 = comb4(d[0], d[4]), a1 = comb4(d[2], d[6]), a2 = comb4(d[1], d[5]),
             a3 = comb4(d[3], d[7]);
    return comb1(comb2(a0, a1), comb2(a2, a3));
}
#endif

/* Tokens ahead whose K and V rows are prefetched: the blocks of a sequence lie anywhere in
 * the cache, and the hardware prefetchers stop at each block's (and page's) start; the cache
 * of a batch-64 step (15.7 MB a layer) is read once, from memory. 16 tokens (24 KB of rows):
 * with the prefetches spread over the work, 16 ran faster than 32, 48 or 64 (two threads, AVX-512). */
#define AHEAD 16

static inline void prefetch_rows(const float *k_row, const float *v_row, int64_t floats) {
    for (int64_t f = 0; f < floats; f += 16) {
        __builtin_prefetch(k_row + f, 0, 3);
        __builtin_prefetch(v_row + f, 0, 2);
    }
}

/* rows[t]: where token t's row of the cache starts (head 0), for t < len: computed once a
 * sequence (a division per token and pass cost more than the attention's arithmetic). */
static inline void row_offsets(const int64_t *table, int64_t len, int64_t block_size,
                               int64_t blk_stride, int64_t tok_stride, int64_t *rows) {
    for (int64_t j = 0, t = 0; t < len; j++) {
        const int64_t base = table[j] * blk_stride;
        for (int64_t s = 0; s < block_size && t < len; s++, t++) rows[t] = base + s * tok_stride;
    }
}

/* Pass 2 for ``ng`` query heads of one KV head (a constant where inlined): out[g] = inv[g] *
 * sum_t sc[g][t] * V[t], the ng x D / VW sums held in registers over all tokens. */
static inline __attribute__((always_inline)) void weigh_values(
    const float *v_cache, const int64_t *rows, int64_t voff, const float *sc, int64_t lenp,
    int64_t len, float *o, const float *inv, const int64_t D, const int ng) {
    const int64_t nv = D / VW;
    vf acc[4][128 / VW];
    for (int g = 0; g < ng; g++)
        for (int64_t c = 0; c < nv; c++) acc[g][c] = (vf){0};
    for (int64_t t = 0; t < len; t++) {
        const float *vv = v_cache + rows[t] + voff;
        for (int64_t c = 0; c < nv; c++) {
            const vf x = loadv(vv + VW * c);
            for (int g = 0; g < ng; g++) acc[g][c] += sc[g * lenp + t] * x;
        }
    }
    for (int g = 0; g < ng; g++)
        for (int64_t c = 0; c < nv; c++) storev(o + g * D + VW * c, acc[g][c] * inv[g]);
}

/* One sequence's KV heads [kh0, kh1): their ``group`` query heads each (rows of ``D`` at
 * ``qb``, head kh0's first) against its ``len`` cached tokens; results to ``ob``.
 * ``scores``: (kh1 - kh0) * group * lenp floats (lenp: len rounded up to VW), ``inv`` one a
 * query head, ``rows`` len int64s of scratch. Inlined with
 * D a constant (64, 128), a multiple of VW.
 * Pass 1 takes VW tokens at a time: their dot products with one query head (held in
 * registers) are summed across lanes into one vector of VW scores (lane_sums). The K and V
 * rows AHEAD tokens on are prefetched, all heads of the range at once (a row's heads are
 * contiguous), so pass 2 finds V in the cache. Pass 2 keeps up to 4 query heads' sums in
 * registers over all tokens. */
static inline void attend_seq(const float *qb, const float *k_cache, const float *v_cache,
                              const int64_t *table, int64_t len, float *ob, int64_t kh0,
                              int64_t kh1, int64_t group, const int64_t D, int64_t block_size,
                              int64_t tok_stride, int64_t blk_stride, float scale,
                              float *scores, float *inv, int64_t *rows) {
    const int64_t nv = D / VW;
    const int64_t lenp = (len + VW - 1) / VW * VW;
    const int64_t nh = (kh1 - kh0) * group;
    const int64_t span = (kh1 - kh0) * D; /* floats of a row this call reads */
    const int64_t off = kh0 * D;
    row_offsets(table, len, block_size, blk_stride, tok_stride, rows);
    for (int64_t t = 0; t < AHEAD && t < len; t++)
        prefetch_rows(k_cache + rows[t] + off, v_cache + rows[t] + off, span);
    /* Pass 1: scores. */
    for (int64_t t0 = 0; t0 < len; t0 += VW) {
        const int64_t n = len - t0 < VW ? len - t0 : VW;
        for (int64_t h = 0; h < nh; h++) {
            /* NOTE: the next rows' prefetches spread over the heads' work, a few tokens each:
             * issued all at once (24 lines a token, 384 for 16) they stalled the loads behind
             * them (1.1-1.2x a call from memory, b2c4059 -> this; /tmp/perf8/pd_bench2.py). */
            for (int64_t s = h; s < VW && t0 + AHEAD + s < len; s += nh) {
                const int64_t r = rows[t0 + AHEAD + s] + off;
                prefetch_rows(k_cache + r, v_cache + r, span);
            }
            const float *qh = qb + h * D;
            const int64_t koff = (h / group) * D;
            vf qv[128 / VW];
            for (int64_t c = 0; c < nv; c++) qv[c] = loadv(qh + VW * c);
            vf d[VW];
            if (n == VW) { /* a whole vector of tokens: unrolled, the sums in registers */
#pragma GCC unroll 16
                for (int s = 0; s < VW; s++) {
                    const float *kv = k_cache + rows[t0 + s] + off + koff;
                    vf dot = qv[0] * loadv(kv);
                    for (int64_t c = 1; c < nv; c++) dot += qv[c] * loadv(kv + VW * c);
                    d[s] = dot;
                }
            } else {
                for (int64_t s = 0; s < VW; s++) {
                    if (s < n) {
                        const float *kv = k_cache + rows[t0 + s] + off + koff;
                        vf dot = qv[0] * loadv(kv);
                        for (int64_t c = 1; c < nv; c++) dot += qv[c] * loadv(kv + VW * c);
                        d[s] = dot;
                    } else {
                        d[s] = (vf){0};
                    }
                }
            }
            storev(scores + h * lenp + t0, lane_sums(d) * scale);
        }
    }
    /* Softmax per query head (normalised at the end). */
    for (int64_t h = 0; h < nh; h++) {
        float *sc = scores + h * lenp;
        float m = sc[0];
        for (int64_t t = 1; t < len; t++) m = sc[t] > m ? sc[t] : m;
        inv[h] = 1.0f / exp_shift_sum(sc, len, m);
    }
    /* Pass 2: weighted sums of the values, up to 4 query heads (of one KV head) at a time. */
    for (int64_t kh = kh0; kh < kh1; kh++) {
        const int64_t voff = kh * D;
        for (int64_t g0 = 0; g0 < group; g0 += 4) {
            const int64_t ng = group - g0 < 4 ? group - g0 : 4;
            const int64_t h0 = (kh - kh0) * group + g0;
            const float *sc = scores + h0 * lenp;
            float *o = ob + h0 * D;
            switch (ng) { /* NOTE: a constant count keeps the sums in registers */
            case 4: weigh_values(v_cache, rows, voff, sc, lenp, len, o, inv + h0, D, 4); break;
            case 3: weigh_values(v_cache, rows, voff, sc, lenp, len, o, inv + h0, D, 3); break;
            case 2: weigh_values(v_cache, rows, voff, sc, lenp, len, o, inv + h0, D, 2); break;
            default: weigh_values(v_cache, rows, voff, sc, lenp, len, o, inv + h0, D, 1); break;
            }
        }
    }
}

/* Any other head size: plain loops. */
static void attend_one_any(const float *qb, const float *k_cache, const float *v_cache,
                           const int64_t *table, int64_t len, float *ob, int64_t group,
                           const int64_t D, int64_t block_size, int64_t tok_stride,
                           int64_t blk_stride, int64_t head_off, float scale, float *scores,
                           float *acc) {
    const int64_t nblocks = (len + block_size - 1) / block_size;
    for (int64_t j = 0; j < nblocks; j++) {
        const float *kb = k_cache + table[j] * blk_stride + head_off;
        const int64_t n = (j == nblocks - 1) ? len - j * block_size : block_size;
        for (int64_t s = 0; s < n; s++) {
            const float *kv = kb + s * tok_stride;
            const int64_t t = j * block_size + s;
            for (int64_t g = 0; g < group; g++) {
                const float *qg = qb + g * D;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; d++) dot += qg[d] * kv[d];
                scores[g * len + t] = dot * scale;
            }
        }
    }
    float inv[MAX_GROUP];
    for (int64_t g = 0; g < group; g++) {
        float *sc = scores + g * len;
        float m = sc[0];
        for (int64_t t = 1; t < len; t++) m = sc[t] > m ? sc[t] : m;
        inv[g] = 1.0f / exp_shift_sum(sc, len, m);
    }
    memset(acc, 0, sizeof(float) * (size_t)(group * D));
    for (int64_t j = 0; j < nblocks; j++) {
        const float *vb = v_cache + table[j] * blk_stride + head_off;
        const int64_t n = (j == nblocks - 1) ? len - j * block_size : block_size;
        for (int64_t s = 0; s < n; s++) {
            const float *vv = vb + s * tok_stride;
            const int64_t t = j * block_size + s;
            for (int64_t g = 0; g < group; g++) {
                const float p = scores[g * len + t];
                float *a = acc + g * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) a[d] += p * vv[d];
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *o = ob + g * D;
        const float *a = acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] = a[d] * inv[g];
    }
}

/* -1: bad shapes; -2: a context length or block id out of range; 0: the batch is valid. */
static int check_decode(const int64_t *block_tables, const int64_t *context_lens, int64_t batch,
                        int64_t heads, int64_t kv_heads, int64_t block_size, int64_t max_blocks,
                        int64_t max_len, int64_t num_blocks) {
    if (kv_heads < 1 || heads < kv_heads || heads % kv_heads || heads / kv_heads > MAX_GROUP || max_len < 1 ||
        block_size < 1 || batch < 0)
        return -1;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = context_lens[b];
        if (len < 1 || len > max_len || len > max_blocks * block_size) return -2;
        const int64_t *table = block_tables + b * max_blocks;
        for (int64_t j = 0; j < (len + block_size - 1) / block_size; j++)
            if (table[j] < 0 || table[j] >= num_blocks) return -2;
    }
    return 0;
}

/* Work is split by (sequence, KV-head range): a whole sequence (all its KV heads, whose
 * rows are contiguous in the cache) when there are enough sequences to share, else one KV
 * head each. Each thread takes a contiguous run of items holding about its share of the
 * tokens (contexts differ in length). q's tokens are ``q_stride`` floats apart (the heads of
 * a token contiguous); out is contiguous. */
static int paged_decode(const float *q, int64_t q_stride, const float *k_cache,
                        const float *v_cache, const int64_t *block_tables,
                        const int64_t *context_lens, float *out, int64_t batch, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, int64_t block_size,
                        int64_t max_blocks, float scale, int64_t max_len, int64_t num_blocks,
                        int threads) {
    const int bad = check_decode(block_tables, context_lens, batch, heads, kv_heads, block_size,
                                 max_blocks, max_len, num_blocks);
    if (bad) return bad;
    const int64_t group = heads / kv_heads;
    const int64_t tok_stride = kv_heads * head_dim; /* one slot of a block */
    const int64_t blk_stride = block_size * tok_stride;
    if (threads < 1) threads = 1;
    const int vec = head_dim == 64 || head_dim == 128;
    const int64_t per_seq = vec && batch >= 2 * threads ? 1 : kv_heads; /* items a sequence */
    const int64_t heads_per_item = kv_heads / per_seq;
    const int64_t items = batch * per_seq;
    int64_t total = 0;
    for (int64_t b = 0; b < batch; b++) total += context_lens[b];
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1) reduction(| : failed)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        /* This thread's items: those whose first token (counted over items) falls in its
         * share of the total. */
        const int64_t lo_tok = total * per_seq * tid / nt, hi_tok = total * per_seq * (tid + 1) / nt;
        int64_t lo = items, hi = items, acc_tok = 0;
        for (int64_t it = 0; it < items; it++) {
            if (lo == items && acc_tok >= lo_tok) lo = it;
            if (acc_tok >= hi_tok) {
                hi = it;
                break;
            }
            acc_tok += context_lens[it / per_seq];
        }
        if (tid == nt - 1) hi = items;
        const int64_t lenp = (max_len + VW - 1) / VW * VW;
        const int64_t nh = heads_per_item * group;
        float *scores = (float *)malloc(sizeof(float) * (size_t)(nh * lenp + nh));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(group * head_dim));
        int64_t *rows = (int64_t *)malloc(sizeof(int64_t) * (size_t)max_len);
        const int ok = scores != NULL && acc != NULL && rows != NULL;
        failed |= !ok;
        for (int64_t it = lo; ok && it < hi; it++) {
            const int64_t b = it / per_seq, kh0 = (it % per_seq) * heads_per_item;
            const int64_t kh1 = kh0 + heads_per_item;
            const int64_t len = context_lens[b];
            const int64_t *table = block_tables + b * max_blocks;
            const int64_t row = b * heads + kh0 * group;
            const float *qb = q + b * q_stride + kh0 * group * head_dim;
            float *ob = out + row * head_dim;
            if (head_dim == 64)
                attend_seq(qb, k_cache, v_cache, table, len, ob, kh0, kh1, group, 64,
                           block_size, tok_stride, blk_stride, scale, scores, scores + nh * lenp, rows);
            else if (head_dim == 128)
                attend_seq(qb, k_cache, v_cache, table, len, ob, kh0, kh1, group, 128,
                           block_size, tok_stride, blk_stride, scale, scores, scores + nh * lenp, rows);
            else
                for (int64_t kh = kh0; kh < kh1; kh++)
                    attend_one_any(qb + (kh - kh0) * group * head_dim, k_cache, v_cache, table,
                                   len, ob + (kh - kh0) * group * head_dim, group, head_dim,
                                   block_size, tok_stride, blk_stride, kh * head_dim, scale,
                                   scores, acc);
        }
        free(scores);
        free(acc);
        free(rows);
    }
    return failed ? -2 : 0;
}

int epd_paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                         const int64_t *block_tables, const int64_t *context_lens, float *out,
                         int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         int64_t block_size, int64_t max_blocks, float scale, int64_t max_len,
                         int64_t num_blocks, int threads) {
    return paged_decode(q, heads * head_dim, k_cache, v_cache, block_tables, context_lens, out,
                        batch, heads, kv_heads, head_dim, block_size, max_blocks, scale,
                        max_len, num_blocks, threads);
}

/* A decode batch's attention in one call: the rotary embedding of q and k in place, k and v
 * written into the cache at ``slots`` (epd_rotary_store_f32), then the paged decode attention
 * of q (epd_paged_decode_f32) into out [B, H, D]. q [B, H, D], k and v [B, Hkv, D] with their
 * own token strides (views into the fused qkv output): no copy of q. The same arithmetic as
 * the two calls, so the same bits. Everything is checked before anything is written: -1 bad
 * shapes, -2 a position outside the tables, -3 a slot outside the cache, -4 a context length
 * or block id out of range. */
int epd_decode_attn_f32(const int64_t *positions, float *q, float *k, const float *v,
                        const float *cos_t, const float *sin_t, float *k_cache, float *v_cache,
                        const int64_t *slots, const int64_t *block_tables,
                        const int64_t *context_lens, float *out, int64_t batch, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, int64_t q_stride, int64_t k_stride,
                        int64_t v_stride, int64_t table_stride, int64_t max_pos,
                        int64_t block_size, int64_t max_blocks, float scale, int64_t max_len,
                        int64_t num_blocks, int threads) {
    if (head_dim < 2 || head_dim % 2 || table_stride < head_dim / 2 ||
        q_stride < heads * head_dim || k_stride < kv_heads * head_dim ||
        v_stride < kv_heads * head_dim)
        return -1;
    int bad = check_positions_slots(positions, slots, batch, max_pos, num_blocks * block_size);
    if (bad) return bad;
    bad = check_decode(block_tables, context_lens, batch, heads, kv_heads, block_size,
                       max_blocks, max_len, num_blocks);
    if (bad) return bad == -2 ? -4 : bad;
    /* NOTE: on the calling thread, as epd_rotary_store_f32 runs a decode batch (below its
     * threshold): an OpenMP region here would cost more than the work. */
    for (int64_t t = 0; t < batch; t++)
        rotate_store_token(q + t * q_stride, k + t * k_stride, v + t * v_stride, positions[t],
                           slots[t], cos_t, sin_t, table_stride, k_cache, v_cache, heads,
                           kv_heads, head_dim);
    return paged_decode(q, q_stride, k_cache, v_cache, block_tables, context_lens, out, batch,
                        heads, kv_heads, head_dim, block_size, max_blocks, scale, max_len,
                        num_blocks, threads);
}
