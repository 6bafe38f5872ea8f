/* The rotary embedding of one token's heads, and its KV cache write, shared by the C kernels
 * of this folder (fused_elementwise.c: epd_rotary_f32, epd_rotary_store_f32; paged_decode.c:
 * epd_decode_attn_f32, which folds them into the decode attention call). One definition, so
 * the fused call writes the same bits as the separate ones.
 *
 * The math is transformers' "rotate half" (NeoX layout: the pairs are (i, i + D/2)).
 * native.py keys its build cache on every header of this folder too. */
#ifndef EPD_ROTARY_H
#define EPD_ROTARY_H

#include <stdint.h>
#include <string.h>

/* [x1, x2] -> [x1 c - x2 s, x2 c + x1 s] on ``n`` heads of ``D`` floats at ``x`` (head h at
 * x + h * D), c and s the first D / 2 entries of the position's table rows. */
static inline void rotate_heads(float *x, int64_t n, int64_t D, const float *c, const float *s) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < n; h++) {
        float *a = x + h * D;
        float *b = a + half;
#pragma omp simd
        for (int64_t i = 0; i < half; i++) {
            const float x1 = a[i], x2 = b[i];
            a[i] = x1 * c[i] - x2 * s[i];
            b[i] = x2 * c[i] + x1 * s[i];
        }
    }
}

/* Token t of q [T, H, D] and k [T, Hkv, D] rotated in place at ``position`` (tables
 * [max_pos, table_stride]), then its k and v rows (Hkv * D floats) copied to cache row
 * ``slot``. The caller has checked the position and the slot. */
static inline void rotate_store_token(float *qt, float *kt, const float *vt, int64_t position,
                                      int64_t slot, const float *cos_t, const float *sin_t,
                                      int64_t table_stride, float *k_cache, float *v_cache,
                                      int64_t H, int64_t Hkv, int64_t D) {
    const float *c = cos_t + position * table_stride;
    const float *s = sin_t + position * table_stride;
    const int64_t row = Hkv * D;
    rotate_heads(qt, H, D, c, s);
    rotate_heads(kt, Hkv, D, c, s);
    memcpy(k_cache + slot * row, kt, sizeof(float) * (size_t)row);
    memcpy(v_cache + slot * row, vt, sizeof(float) * (size_t)row);
}

/* -2: a position outside the tables; -3: a slot outside the cache; 0: all in range. */
static inline int check_positions_slots(const int64_t *positions, const int64_t *slots,
                                        int64_t T, int64_t max_pos, int64_t num_slots) {
    for (int64_t t = 0; t < T; t++) {
        if (positions[t] < 0 || positions[t] >= max_pos) return -2;
        if (slots[t] < 0 || slots[t] >= num_slots) return -3;
    }
    return 0;
}

#endif
