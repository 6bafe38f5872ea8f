/* Causal prefill attention on the CPU for fresh prompts (no cached prefix): each prompt's
 * queries attend to its own keys 0..i, float32, GQA.
 *
 * Why: torch's SDPA (its flash CPU kernel) ran at ~37 GFLOP/s on this project's machine for
 * the 128-token prompts of the offline benchmark, 6 % of the run (RESULTS.md, perf7); the
 * matrices are small (128 x 64 per head) and its blocks and per-block bookkeeping dominate.
 * Here each work item is one prompt's KV head and a block of its query tokens with all the
 * query heads that share that KV head (their rows together: the keys are read once for
 * all of them), so the score and value products are register-blocked GEMMs:
 *   S = Q K^T: K transposed once per item and key chunk, R query rows x NV vectors of keys
 *             held in registers, a broadcast of q[r][d] per row;
 *   O += P V:  R2 rows x one slab of 4 vectors of the head, a broadcast of p[r][j].
 * Softmax is flash's online form over key chunks of KC (one chunk for prompts up to KC):
 * row max, exp(s - m) (epd_exp.h, about 1 ulp), row sum, the running output rescaled when a
 * later chunk raises the max; the output divided by the sum at the end. The order of
 * additions differs from SDPA's, so results agree to fp32 rounding, not bit for bit.
 *
 * Layouts (float32): q [T, H, D], k and v [T, Hkv, D] with any token stride (views into the
 * fused qkv output), out [T, H, D] with its own token stride; prompts as (start, len) rows of
 * the flattened batch. Query head h reads KV head h / (H / Hkv) (transformers' repeat_kv).
 * D must be 64 or 128 (else -1: callers keep SDPA).
 *
 * Built at run time by services/engine/layers/native.py (host compiler, -march=native, so
 * AVX-512 or AVX2 as the CPU has; OpenMP); called through ctypes (prefill_attn.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "epd_exp.h"

#ifdef __AVX512F__
#define VW 16
#define R 6  /* S: query rows a micro-kernel */
#define NV 4 /* S: vectors of keys a micro-kernel (24 accumulators of 32 registers) */
#define R2 6 /* PV: rows a micro-kernel, x 4 vectors of the head */
#else
#define VW 8
#define R 4
#define NV 2
#define R2 3 /* 12 accumulators of 16 registers */
#endif
typedef float vf __attribute__((vector_size(4 * VW)));

#define KW (NV * VW) /* keys a micro-kernel: the key chunk is padded to a multiple */
#define KC 256       /* keys a chunk of the online softmax (a multiple of KW) */
/* Row stride of K^T and of the scores: NOTE: not KC. Rows 1 KiB apart fall in 4 of L1's 64
 * sets, and the transpose's 64 rows evicted one another on every write (it took more than
 * half the kernel's time). */
#define KS (KC + 16)
#define SLAB (4 * VW) /* floats of the head a PV micro-kernel holds */
#define ROWS_TARGET 96 /* query rows (tokens x group heads) an item */
#define MAX_GROUP 64

static inline vf loadv(const float *p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void storev(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

static inline vf bcast(float x) { return (vf){0} + x; }

typedef int32_t vi __attribute__((vector_size(4 * VW)));

static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }

/* epd_exp (epd_exp.h) on a vector: the same steps, lane by lane. */
static inline vf exp_v(vf x) {
    x = vsel(x < EPD_EXP_LO, bcast(EPD_EXP_LO), x);
    x = vsel(x > EPD_EXP_HI, bcast(EPD_EXP_HI), x);
    EPD_EXP_STEPS(vf, x, n, p);
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
}

/* S[r][c0 .. c0 + KW) = (Q[r] . KT[:, c]) * scale for R rows from r0. */
static inline void s_kernel(const float *qs, const float *kt, float *s, int64_t r0, int64_t c0,
                            int64_t D, int64_t ktp, float scale) {
    vf acc[R][NV];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int c = 0; c < NV; c++) acc[r][c] = (vf){0};
    for (int64_t d = 0; d < D; d++) {
        vf kv[NV];
#pragma GCC unroll 8
        for (int c = 0; c < NV; c++) kv[c] = loadv(kt + d * ktp + c0 + c * VW);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const vf qb = bcast(qs[(r0 + r) * D + d]);
#pragma GCC unroll 8
            for (int c = 0; c < NV; c++) acc[r][c] += qb * kv[c];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int c = 0; c < NV; c++) storev(s + (r0 + r) * KS + c0 + c * VW, acc[r][c] * scale);
}

/* O[r][o0 .. o0 + SLAB) += sum_j P[r][j] V[j][o0 ..] for R2 rows from r0, keys [0, n). */
static inline void pv_kernel(const float *p, const float *vb, int64_t vstride, float *o,
                             int64_t r0, int64_t o0, int64_t n, int64_t D) {
    vf acc[R2][4];
#pragma GCC unroll 8
    for (int r = 0; r < R2; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) acc[r][c] = loadv(o + (r0 + r) * D + o0 + c * VW);
    for (int64_t j = 0; j < n; j++) {
        const float *vr = vb + j * vstride + o0;
        vf vv[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) vv[c] = loadv(vr + c * VW);
#pragma GCC unroll 8
        for (int r = 0; r < R2; r++) {
            const vf pb = bcast(p[(r0 + r) * KS + j]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) acc[r][c] += pb * vv[c];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R2; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) storev(o + (r0 + r) * D + o0 + c * VW, acc[r][c]);
}

/* Per-thread scratch. Rows are token-major: row r is token tok0 + r / group, query head
 * g = r % group of the item's KV head; rows past the item's last are padding (zeros, never
 * written out). */
typedef struct {
    float *qs; /* [rows_p][D] */
    float *kt; /* [D][KS] */
    float *s;  /* [rows_p][KS] scores, then probabilities */
    float *o;  /* [rows_p][D] */
    float *m;  /* [rows_p] running max */
    float *l;  /* [rows_p] running sum */
} scratch_t;

static void attend_item(const float *q, const float *k, const float *v, float *out,
                        int64_t start, int64_t tok0, int64_t ntok, int64_t kh, int64_t group,
                        int64_t D, int64_t qstride, int64_t kstride, int64_t vstride,
                        int64_t ostride, float scale, scratch_t *w) {
    const int64_t rows = ntok * group;
    vi iota;
    for (int i = 0; i < VW; i++) iota[i] = i;
    const int64_t rows_s = (rows + R - 1) / R * R;
    const int64_t rows_pv = (rows + R2 - 1) / R2 * R2;
    const int64_t rows_p = rows_s > rows_pv ? rows_s : rows_pv;
    for (int64_t r = 0; r < rows_p; r++) {
        float *dst = w->qs + r * D;
        if (r < rows) {
            const float *src = q + (start + tok0 + r / group) * qstride + (kh * group + r % group) * D;
            memcpy(dst, src, sizeof(float) * (size_t)D);
        } else {
            memset(dst, 0, sizeof(float) * (size_t)D);
        }
        w->m[r] = -__builtin_inff();
        w->l[r] = 0.0f;
    }
    memset(w->o, 0, sizeof(float) * (size_t)(rows_p * D));
    const int64_t kend = tok0 + ntok; /* keys [0, kend) are attended by some row */
    for (int64_t j0 = 0; j0 < kend; j0 += KC) {
        const int64_t jn = kend - j0 < KC ? kend - j0 : KC;
        const int64_t jnp = (jn + KW - 1) / KW * KW;
        /* K^T of this chunk, zero-padded to a whole micro-kernel. */
        for (int64_t j = 0; j < jn; j++) {
            const float *kr = k + (start + j0 + j) * kstride + kh * D;
            for (int64_t d = 0; d < D; d++) w->kt[d * KS + j] = kr[d];
        }
        for (int64_t j = jn; j < jnp; j++)
            for (int64_t d = 0; d < D; d++) w->kt[d * KS + j] = 0.0f;
        /* Scores, only as far as the micro-block's last token reaches. */
        for (int64_t r0 = 0; r0 < rows_s; r0 += R) {
            int64_t last = (r0 + R - 1) / group; /* the block's last token (item-relative) */
            if (last >= ntok) last = ntok - 1;
            int64_t reach = tok0 + last + 1 - j0; /* keys of this chunk it attends */
            if (reach <= 0) continue;
            if (reach > jn) reach = jn;
            for (int64_t c0 = 0; c0 < reach; c0 += KW)
                s_kernel(w->qs, w->kt, w->s, r0, c0, D, KS, scale);
        }
        /* Online softmax: each row's keys j0 .. min(its token, chunk end). */
        for (int64_t r = 0; r < rows_p; r++) {
            float *sr = w->s + r * KS;
            int64_t n = r < rows ? tok0 + r / group + 1 - j0 : 0; /* padding: none */
            if (n > jn) n = jn;
            if (n <= 0) {
                /* Nothing of this chunk: zero probabilities for the PV micro-block. */
                memset(sr, 0, sizeof(float) * (size_t)jn);
                continue;
            }
            const int64_t nvec = (n + VW - 1) / VW;
            for (int64_t j = n; j < nvec * VW; j++) sr[j] = -__builtin_inff();
            vf mv = loadv(sr);
            for (int64_t c = 1; c < nvec; c++) mv = vmax(mv, loadv(sr + c * VW));
            float mc = mv[0];
            for (int i = 1; i < VW; i++) mc = mv[i] > mc ? mv[i] : mc;
            const float mo = w->m[r];
            const float mn = mc > mo ? mc : mo;
            vf sv = (vf){0};
            for (int64_t c = 0; c < nvec; c++) {
                const vi keep = iota + (int32_t)(c * VW) < (int32_t)n;
                const vf e = (vf)((vi)exp_v(loadv(sr + c * VW) - mn) & keep);
                storev(sr + c * VW, e);
                sv += e;
            }
            float sum = 0.0f;
            for (int i = 0; i < VW; i++) sum += sv[i];
            if (nvec * VW < jn) memset(sr + nvec * VW, 0, sizeof(float) * (size_t)(jn - nvec * VW));
            if (mo != -__builtin_inff() && mn != mo) {
                const float alpha = epd_exp(mo - mn);
                w->l[r] *= alpha;
                float *orow = w->o + r * D;
                for (int64_t d = 0; d < D; d++) orow[d] *= alpha;
            }
            w->l[r] += sum;
            w->m[r] = mn;
        }
        /* O += P V over the chunk's keys. */
        const float *vb = v + (start + j0) * vstride + kh * D;
        for (int64_t r0 = 0; r0 < rows_pv; r0 += R2) {
            int64_t last = (r0 + R2 - 1) / group;
            if (last >= ntok) last = ntok - 1;
            int64_t reach = tok0 + last + 1 - j0;
            if (reach <= 0) continue;
            if (reach > jn) reach = jn;
            for (int64_t o0 = 0; o0 < D; o0 += SLAB) pv_kernel(w->s, vb, vstride, w->o, r0, o0, reach, D);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *dst = out + (start + tok0 + r / group) * ostride + (kh * group + r % group) * D;
        const float inv = 1.0f / w->l[r];
        const float *orow = w->o + r * D;
        for (int64_t d = 0; d < D; d++) dst[d] = orow[d] * inv;
    }
}

/* Work items (prompt, KV head, block of query tokens), the longest (latest blocks: the most
 * keys) first, shared out dynamically: causal blocks differ in cost. */
int epd_prefill_attn_f32(const float *q, const float *k, const float *v, float *out,
                         const int64_t *starts, const int64_t *lens, int64_t nseg, int64_t heads,
                         int64_t kv_heads, int64_t head_dim, int64_t qstride, int64_t kstride,
                         int64_t vstride, int64_t ostride, float scale, int threads) {
    if (kv_heads < 1 || heads % kv_heads || nseg < 0) return -1;
    const int64_t group = heads / kv_heads;
    const int64_t D = head_dim;
    if (group > MAX_GROUP || (D != 64 && D != 128)) return -1;
    for (int64_t s = 0; s < nseg; s++)
        if (lens[s] < 1 || starts[s] < 0) return -2;
    int64_t bq = ROWS_TARGET / group; /* tokens an item */
    if (bq < 1) bq = 1;
    int64_t nitems = 0, maxlen = 0;
    for (int64_t s = 0; s < nseg; s++) {
        nitems += (lens[s] + bq - 1) / bq * kv_heads;
        if (lens[s] > maxlen) maxlen = lens[s];
    }
    if (nitems == 0) return 0;
    /* Items ordered by their block index from the end (heaviest first across prompts). */
    int64_t *items = (int64_t *)malloc(sizeof(int64_t) * (size_t)(3 * nitems));
    if (items == NULL) return -3;
    const int64_t maxblocks = (maxlen + bq - 1) / bq;
    int64_t n = 0;
    for (int64_t b = maxblocks - 1; b >= 0; b--)
        for (int64_t s = 0; s < nseg; s++) {
            if (b * bq >= lens[s]) continue;
            for (int64_t kh = 0; kh < kv_heads; kh++) {
                items[3 * n] = s;
                items[3 * n + 1] = kh;
                items[3 * n + 2] = b;
                n++;
            }
        }
    if (threads < 1) threads = 1;
    const int64_t rows_p = bq * group + (R > R2 ? R : R2);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && nitems > 1) reduction(| : failed)
    {
        scratch_t w;
        w.qs = (float *)malloc(sizeof(float) * (size_t)(rows_p * D));
        w.kt = (float *)malloc(sizeof(float) * (size_t)(D * KS));
        w.s = (float *)malloc(sizeof(float) * (size_t)(rows_p * KS));
        w.o = (float *)malloc(sizeof(float) * (size_t)(rows_p * D));
        w.m = (float *)malloc(sizeof(float) * (size_t)rows_p);
        w.l = (float *)malloc(sizeof(float) * (size_t)rows_p);
        const int ok = w.qs && w.kt && w.s && w.o && w.m && w.l;
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nitems; i++) {
            if (!ok) continue;
            const int64_t s = items[3 * i], kh = items[3 * i + 1], b = items[3 * i + 2];
            const int64_t tok0 = b * bq;
            const int64_t ntok = lens[s] - tok0 < bq ? lens[s] - tok0 : bq;
            attend_item(q, k, v, out, starts[s], tok0, ntok, kh, group, D, qstride, kstride,
                        vstride, ostride, scale, &w);
        }
        free(w.qs);
        free(w.kt);
        free(w.s);
        free(w.o);
        free(w.m);
        free(w.l);
    }
    free(items);
    return failed ? -3 : 0;
}
