/* Fused elementwise kernels of a decoder layer on the CPU, float32: RMSNorm (with the residual
 * add folded in), silu(gate) * up, and the rotary embedding of q and k in place.
 *
 * Why: in torch each of these is several ops (RMSNorm alone is pow, mean, add, rsqrt, mul,
 * mul), each a pass over the rows and, on more than one thread, an OpenMP region whose
 * sleeping threads must be woken. Here each is one pass and at most one region, and none for
 * small row counts (a decode batch), where waking a thread costs more than the work.
 *
 * Built at run time by services/engine/layers/native.py (host compiler, -march=native,
 * OpenMP); called through ctypes by services/engine/layers/cpu_fused.py.
 *
 * The math is transformers' (Llama/Qwen): rms_norm = w * (x * rsqrt(mean(x^2) + eps)),
 * silu(g) = g / (1 + exp(-g)), rotary "rotate half" (NeoX layout: the pairs are (i, i + D/2)).
 * The sums of squares run in a different order from torch's reduction and exp is a
 * polynomial (about 1 ulp), so results agree with the torch path to fp32 rounding, not bit
 * for bit (the greedy reference tests check the tokens).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "epd_exp.h"
#include "epd_rotary.h"

/* Below this many elements a call runs on the calling thread alone (no OpenMP region): a
 * decode batch of the default model is 64 x 576; waking a passive thread costs tens of
 * microseconds, the work a few. */
#define PARALLEL_MIN_ELEMS (1 << 17)

/* out = w * (s * rsqrt(mean(s^2) + eps)) per row, s = x (+ delta, also written to sum_out).
 * Rows of ``hidden`` floats; x, delta, sum_out and out rows ``stride`` apart (x may be a view
 * with a wider row; delta, sum_out and out are the caller's contiguous tensors). */
static inline void norm_row(const float *x, const float *delta, float *sum_out, const float *w,
                            float *out, int64_t hidden, float eps) {
    float ss = 0.0f;
    if (delta != 0) {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < hidden; i++) {
            const float s = x[i] + delta[i];
            sum_out[i] = s;
            ss += s * s;
        }
        x = sum_out;
    } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < hidden; i++) ss += x[i] * x[i];
    }
    const float r = 1.0f / sqrtf(ss / (float)hidden + eps);
#pragma omp simd
    for (int64_t i = 0; i < hidden; i++) out[i] = w[i] * (x[i] * r);
}

int epd_rms_norm_f32(const float *x, const float *delta, float *sum_out, const float *w,
                     float *out, int64_t rows, int64_t hidden, int64_t x_stride, float eps,
                     int threads) {
    if (rows < 0 || hidden < 1 || x_stride < hidden || (delta != 0 && sum_out == 0)) return -1;
    const int parallel = threads > 1 && rows > 1 && rows * hidden >= PARALLEL_MIN_ELEMS;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static)
    for (int64_t t = 0; t < rows; t++)
        norm_row(x + t * x_stride, delta ? delta + t * hidden : 0,
                 sum_out ? sum_out + t * hidden : 0, w, out + t * hidden, hidden, eps);
    return 0;
}

/* Not inlined, with restrict pointers: inlined into the OpenMP loop body GCC 12 does not
 * vectorize this loop ("complicated access pattern"), and scalar it was 8x slower than torch. */
static __attribute__((noinline)) void silu_mul_row(const float *restrict g, const float *restrict u,
                                float *restrict o, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) o[i] = g[i] / (1.0f + epd_exp(-g[i])) * u[i];
}

/* out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]; gate_up rows ``in_stride`` apart,
 * out contiguous [rows, inter]. */
int epd_silu_mul_f32(const float *gate_up, float *out, int64_t rows, int64_t inter,
                     int64_t in_stride, int threads) {
    if (rows < 0 || inter < 1 || in_stride < 2 * inter) return -1;
    const int parallel = threads > 1 && rows > 1 && rows * inter >= PARALLEL_MIN_ELEMS;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static)
    for (int64_t t = 0; t < rows; t++)
        silu_mul_row(gate_up + t * in_stride, gate_up + t * in_stride + inter, out + t * inter,
                     inter);
    return 0;
}

/* Rotary embedding of q [T, H, D] and k [T, Hkv, D] in place (heads contiguous within a
 * token, tokens ``q_stride`` / ``k_stride`` floats apart: views into the fused qkv output
 * work), by the cos / sin tables [max_pos, table_stride] at ``positions`` [T]. A position
 * outside the tables is an error (-2), checked before anything is written. */
int epd_rotary_f32(const int64_t *positions, float *q, float *k, const float *cos_t,
                   const float *sin_t, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                   int64_t q_stride, int64_t k_stride, int64_t table_stride, int64_t max_pos,
                   int threads) {
    if (T < 0 || D < 2 || D % 2 || table_stride < D / 2) return -1;
    for (int64_t t = 0; t < T; t++)
        if (positions[t] < 0 || positions[t] >= max_pos) return -2;
    const int parallel = threads > 1 && T > 1 && T * (H + Hkv) * D >= PARALLEL_MIN_ELEMS;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + positions[t] * table_stride;
        const float *s = sin_t + positions[t] * table_stride;
        rotate_heads(q + t * q_stride, H, D, c, s);
        rotate_heads(k + t * k_stride, Hkv, D, c, s);
    }
    return 0;
}

/* The rotary embedding of q and k in place (as epd_rotary_f32), and the token's rotated k and
 * its v written into the paged KV cache at ``slots`` [T] (cache rows of Hkv * D floats, slot
 * s at row s): the KV write the attention backend would otherwise make (two index_copy_ a
 * layer), in the same pass. v [T, Hkv, D] with tokens ``v_stride`` floats apart. A position
 * outside the tables (-2) or a slot outside the cache (-3) is an error, checked before
 * anything is written. */
int epd_rotary_store_f32(const int64_t *positions, float *q, float *k, const float *v,
                         const float *cos_t, const float *sin_t, float *k_cache, float *v_cache,
                         const int64_t *slots, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                         int64_t q_stride, int64_t k_stride, int64_t v_stride,
                         int64_t table_stride, int64_t max_pos, int64_t num_slots, int threads) {
    if (T < 0 || D < 2 || D % 2 || table_stride < D / 2 || num_slots < 0) return -1;
    const int bad = check_positions_slots(positions, slots, T, max_pos, num_slots);
    if (bad) return bad;
    const int parallel = threads > 1 && T > 1 && T * (H + 2 * Hkv) * D >= PARALLEL_MIN_ELEMS;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static)
    for (int64_t t = 0; t < T; t++)
        rotate_store_token(q + t * q_stride, k + t * k_stride, v + t * v_stride, positions[t],
                           slots[t], cos_t, sin_t, table_stride, k_cache, v_cache, H, Hkv, D);
    return 0;
}

/* x += y over n floats (the residual add after the MLP): one pass, on the calling thread
 * below the threshold (torch's add wakes its threads from 32,768 elements: every decode). */
static __attribute__((noinline)) void add_span(float *restrict x, const float *restrict y,
                                               int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

int epd_add_f32(float *x, const float *y, int64_t n, int threads) {
    if (n < 0) return -1;
    const int64_t chunk = 1 << 14;
    const int64_t chunks = (n + chunk - 1) / chunk;
    const int parallel = threads > 1 && n >= PARALLEL_MIN_ELEMS;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t start = c * chunk;
        add_span(x + start, y + start, (n - start < chunk ? n - start : chunk));
    }
    return 0;
}

/* The index of each row's maximum, as torch.argmax decides it: the first of equal maxima,
 * and a NaN counts as the maximum (the first NaN). Rows of n floats, ``stride`` apart.
 * Why: torch's CPU argmax over a decode step's logits (64 x 49,152) took ~1 ms on two threads,
 * ~2.4 ms on one: it does not vectorize the reduction. Here a vectorized max (and NaN test)
 * and then a search for its first index, blocks of 64 tested at once. */
#define ARGMAX_BLOCK 64
static int64_t argmax_row(const float *x, int64_t n) {
    float m = x[0];
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < n; i++) {
        m = x[i] > m ? x[i] : m;
        nan |= x[i] != x[i];
    }
    for (int64_t b = 0; b < n; b += ARGMAX_BLOCK) {
        const int64_t e = n - b < ARGMAX_BLOCK ? n : b + ARGMAX_BLOCK;
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t i = b; i < e; i++) hit |= nan ? x[i] != x[i] : x[i] == m;
        if (hit)
            for (int64_t i = b; i < e; i++)
                if (nan ? x[i] != x[i] : x[i] == m) return i;
    }
    return 0; /* not reached: m is one of the row's values */
}

int epd_argmax_f32(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out,
                   int threads) {
    if (rows < 0 || n < 1 || stride < n) return -1;
    const int parallel = threads > 1 && rows > 1 && rows * n >= PARALLEL_MIN_ELEMS;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * stride, n);
    return 0;
}
