/* Batched LoRA decode rows on the CPU: see services/engine/layers/cpu_lora.py. */
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define MAX_SHARDS 8
#define COL_BLOCK 64
#define W_BLOCK 8

typedef struct {
    const float *a;                 /* [slots, width, in] */
    int64_t in_features, width, rank, shards, out_features;
    const float *bt[MAX_SHARDS];    /* per shard: [slots, rank, size] */
    int64_t offset[MAX_SHARDS];     /* per shard: first output column */
    int64_t size[MAX_SHARDS];       /* per shard: output columns */
} Layer;

typedef struct {
    const int64_t *order;  /* batch rows, slot by slot */
    const int64_t *starts; /* [slots] */
    const int64_t *counts; /* [slots] */
    int64_t slots, rows;   /* rows: len(order) */
    float *xa;             /* scratch [rows, width] (position in order) */
} Batch;

static void shrink_block(const Layer *L, const Batch *B, const float *x, int64_t ldx,
                         int64_t s, int64_t w0, int64_t w1) {
    const int64_t in = L->in_features, width = L->width;
    const int64_t n = B->counts[s], first = B->starts[s];
    const int64_t *rows = B->order + first;
    const float *A = L->a + s * width * in;
    for (int64_t j = 0; j < n; j += 4) {
        const int64_t m = n - j < 4 ? n - j : 4;
        const float *x0 = x + rows[j] * ldx;
        const float *x1 = x + rows[j + (m > 1)] * ldx;
        const float *x2 = x + rows[j + (m > 2 ? 2 : 0)] * ldx;
        const float *x3 = x + rows[j + (m > 3 ? 3 : 0)] * ldx;
        for (int64_t w = w0; w < w1; w++) {
            const float *ar = A + w * in;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            #pragma omp simd reduction(+:s0,s1,s2,s3)
            for (int64_t k = 0; k < in; k++) {
                const float v = ar[k];
                s0 += v * x0[k]; s1 += v * x1[k]; s2 += v * x2[k]; s3 += v * x3[k];
            }
            float *out = B->xa + (first + j) * width + w;
            out[0] = s0;
            if (m > 1) out[width] = s1;
            if (m > 2) out[2 * width] = s2;
            if (m > 3) out[3 * width] = s3;
        }
    }
}

static void expand_block(const Layer *L, const Batch *B, float *y, int64_t ldy,
                         int64_t s, int64_t i, int64_t c0, int64_t c1) {
    const int64_t rank = L->rank, width = L->width, size = L->size[i];
    const int64_t n = B->counts[s], first = B->starts[s];
    const float *bt = L->bt[i] + s * rank * size;
    float acc[COL_BLOCK];
    for (int64_t j = 0; j < n; j++) {
        float *yr = y + B->order[first + j] * ldy + L->offset[i] + c0;
        const float *xj = B->xa + (first + j) * width + i * rank;
        const int64_t cb = c1 - c0;
        for (int64_t c = 0; c < cb; c++) acc[c] = 0.f;
        for (int64_t k = 0; k < rank; k++) {
            const float v = xj[k];
            const float *br = bt + k * size + c0;
            #pragma omp simd
            for (int64_t c = 0; c < cb; c++) acc[c] += v * br[c];
        }
        #pragma omp simd
        for (int64_t c = 0; c < cb; c++) yr[c] += acc[c];
    }
}

/* y[rows] += the LoRA delta of each row's slot. */
void lora_apply(const Layer *L, const Batch *B, const float *x, int64_t ldx, float *y,
                int64_t ldy, int threads) {
    const int64_t slots = B->slots;
    const int64_t wblocks = (L->width + W_BLOCK - 1) / W_BLOCK;
    int64_t cblocks = 0;
    for (int64_t i = 0; i < L->shards; i++) cblocks += (L->size[i] + COL_BLOCK - 1) / COL_BLOCK;
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < slots * wblocks; t++) {
            const int64_t s = t / wblocks, wb = t % wblocks;
            if (!B->counts[s]) continue;
            const int64_t w0 = wb * W_BLOCK;
            const int64_t w1 = w0 + W_BLOCK < L->width ? w0 + W_BLOCK : L->width;
            shrink_block(L, B, x, ldx, s, w0, w1);
        }
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < slots * cblocks; t++) {
            const int64_t s = t / cblocks;
            int64_t cbk = t % cblocks, i = 0;
            if (!B->counts[s]) continue;
            while (cbk >= (L->size[i] + COL_BLOCK - 1) / COL_BLOCK) {
                cbk -= (L->size[i] + COL_BLOCK - 1) / COL_BLOCK;
                i++;
            }
            const int64_t c0 = cbk * COL_BLOCK;
            const int64_t c1 = c0 + COL_BLOCK < L->size[i] ? c0 + COL_BLOCK : L->size[i];
            expand_block(L, B, y, ldy, s, i, c0, c1);
        }
    }
}
