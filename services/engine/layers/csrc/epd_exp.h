/* exp(x) in plain arithmetic that vectorizes, shared by the C kernels of this folder
 * (fused_elementwise.c: silu; paged_decode.c: softmax). libm's expf does not vectorize
 * without fast-math, which the kernels avoid (it would change NaN and rounding rules).
 *
 * exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by a degree-6
 * polynomial (Cephes' expf coefficients, about 1 ulp). Clamped to [-87.3, 88.3]: 0 and inf
 * are not reached (silu: g / (1 + e^88) is 0 to fp32 precision for the g that reach it;
 * softmax: e^-87.3 beside the maximum's 1 is 0 to fp32 precision). NaN stays NaN.
 *
 * NOTE: with AVX-512, GCC 12 vectorizes the loops calling this (-fopt-info-vec); two forms
 * it does not: __builtin_roundevenf (hence the magic-number round) and a union kept in memory
 * (hence the memcpy). For AVX2 (-march=x86-64-v3) it does not vectorize them ("control flow
 * in loop": the clamps); -fno-trapping-math makes it, but then splits the clamped cases
 * into a second division and the AVX-512 silu ran 2.7x slower, so it is not used.
 *
 * native.py keys its build cache on every header of this folder too. */
#ifndef EPD_EXP_H
#define EPD_EXP_H

#include <stdint.h>

/* The clamp bounds, and the reduction and polynomial of both forms: T is float here and a
 * GCC vector of floats in prefill_attn.c's exp_v (the same steps lane by lane). Declares
 * n = round(x / ln 2) and p = exp(x - n ln 2); x must be clamped already. */
#define EPD_EXP_LO (-87.3f)
#define EPD_EXP_HI (88.3f)
/* Round to nearest even by adding and subtracting 1.5 * 2^23 (exact for |v| < 2^22; no
 * fast-math here, so the compiler keeps both). */
#define EPD_EXP_STEPS(T, x, n, p)                                               \
    const T n = ((x) * 1.44269504088896341f + 12582912.0f) - 12582912.0f;     \
    const T n##_r = ((x) - n * 0.693359375f) + n * 2.12194440e-4f;              \
    T p = n##_r * 1.9875691500e-4f + 1.3981999507e-3f;                          \
    p = p * n##_r + 8.3334519073e-3f;                                           \
    p = p * n##_r + 4.1665795894e-2f;                                           \
    p = p * n##_r + 1.6666665459e-1f;                                           \
    p = p * n##_r + 5.0000001201e-1f;                                           \
    p = p * n##_r * n##_r + n##_r + 1.0f

static inline float epd_exp(float x) {
    x = x < EPD_EXP_LO ? EPD_EXP_LO : x;
    x = x > EPD_EXP_HI ? EPD_EXP_HI : x;
    EPD_EXP_STEPS(float, x, n, p);
    /* n in [-126, 127]: a normal power of two. */
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif
