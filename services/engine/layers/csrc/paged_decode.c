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
 * Per (sequence, KV head) the query heads of its group are done together, two passes over
 * the context: scores (q . k * scale) into a scratch row, then softmax and the weighted sum
 * of values. Sums run in float32 like SDPA's CPU kernels; the order of additions differs, so
 * results agree to fp32 rounding, not bit for bit.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "epd_exp.h"

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
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline vf loadv(const float *p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void storev(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

/* The sum of the lanes as a tree (halves added): a plain loop would be dependent scalar
 * adds, as C's order of additions must be kept without fast-math. */
static inline float hsum(vf v) {
#if VW == 16
    const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    const v8 a = v;
#endif
    const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* One (sequence, KV head): the ``group`` query heads at ``qb`` (consecutive rows of ``D``)
 * against the sequence's ``len`` cached tokens; results to ``ob``. ``scores``: group * len
 * floats, ``acc``: group * D floats of scratch. Inlined with D a constant (64, 128), a
 * multiple of VW: the dot products and sums are whole vectors, and in pass 2 each
 * query head's sums stay in registers over a block's tokens (stored once a block: a sum
 * kept in memory was stored and reloaded at every token). */
static inline void attend_one(const float *qb, const float *k_cache, const float *v_cache,
                              const int64_t *table, int64_t len, float *ob, int64_t group,
                              const int64_t D, int64_t block_size, int64_t tok_stride,
                              int64_t blk_stride, int64_t head_off, float scale, float *scores,
                              float *acc) {
    const int64_t nblocks = (len + block_size - 1) / block_size;
    const int64_t nv = D / VW;
    /* Pass 1: scores of every query head of the group. */
    for (int64_t j = 0; j < nblocks; j++) {
        const float *kb = k_cache + table[j] * blk_stride + head_off;
        const int64_t n = (j == nblocks - 1) ? len - j * block_size : block_size;
        for (int64_t s = 0; s < n; s++) {
            const float *kv = kb + s * tok_stride;
            const int64_t t = j * block_size + s;
            for (int64_t g = 0; g < group; g++) {
                const float *qg = qb + g * D;
                vf dot = loadv(qg) * loadv(kv);
                for (int64_t c = 1; c < nv; c++) dot += loadv(qg + VW * c) * loadv(kv + VW * c);
                scores[g * len + t] = hsum(dot) * scale;
            }
        }
    }
    /* Softmax per query head (normalised at the end). */
    float inv[MAX_GROUP];
    for (int64_t g = 0; g < group; g++) {
        float *sc = scores + g * len;
        float m = sc[0];
        for (int64_t t = 1; t < len; t++) m = sc[t] > m ? sc[t] : m;
        inv[g] = 1.0f / exp_shift_sum(sc, len, m);
    }
    /* Pass 2: weighted sum of the values, a block at a time per query head. */
    memset(acc, 0, sizeof(float) * (size_t)(group * D));
    for (int64_t j = 0; j < nblocks; j++) {
        const float *vb = v_cache + table[j] * blk_stride + head_off;
        const int64_t n = (j == nblocks - 1) ? len - j * block_size : block_size;
        for (int64_t g = 0; g < group; g++) {
            const float *p = scores + g * len + j * block_size;
            float *a = acc + g * D;
            for (int64_t c = 0; c < nv; c++) {
                vf sum = loadv(a + VW * c);
                for (int64_t s = 0; s < n; s++) sum += p[s] * loadv(vb + s * tok_stride + VW * c);
                storev(a + VW * c, sum);
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

int epd_paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                         const int64_t *block_tables, const int64_t *context_lens, float *out,
                         int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         int64_t block_size, int64_t max_blocks, float scale, int64_t max_len,
                         int64_t num_blocks, int threads) {
    const int64_t group = heads / kv_heads;
    if (group < 1 || group > MAX_GROUP || heads % kv_heads || max_len < 1) return -1;
    const int64_t tok_stride = kv_heads * head_dim; /* one slot of a block */
    const int64_t blk_stride = block_size * tok_stride;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(group * max_len));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(group * head_dim));
        const int ok = scores != NULL && acc != NULL;
        failed |= !ok;
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t kh = 0; kh < kv_heads; kh++) {
                const int64_t len = context_lens[b];
                if (!ok || len < 1 || len > max_len || len > max_blocks * block_size) {
                    failed = 1;
                    continue;
                }
                const int64_t *table = block_tables + b * max_blocks;
                int bad = 0;
                for (int64_t j = 0; j < (len + block_size - 1) / block_size; j++)
                    bad |= table[j] < 0 || table[j] >= num_blocks;
                if (bad) {
                    failed = 1;
                    continue;
                }
                const int64_t row = b * heads + kh * group;
                const float *qb = q + row * head_dim;
                float *ob = out + row * head_dim;
                const int64_t off = kh * head_dim;
                if (head_dim == 64)
                    attend_one(qb, k_cache, v_cache, table, len, ob, group, 64, block_size,
                               tok_stride, blk_stride, off, scale, scores, acc);
                else if (head_dim == 128)
                    attend_one(qb, k_cache, v_cache, table, len, ob, group, 128, block_size,
                               tok_stride, blk_stride, off, scale, scores, acc);
                else
                    attend_one_any(qb, k_cache, v_cache, table, len, ob, group, head_dim,
                                   block_size, tok_stride, blk_stride, off, scale, scores, acc);
            }
        }
        free(scores);
        free(acc);
    }
    return failed ? -2 : 0;
}
