/* Low-bit matmuls for CPU decoding: y = x @ W^T (+ bias), x fp32 (M, K), M small.
 *
 * Batch-1 decoding reads every weight once per token, so its speed is the memory
 * bandwidth divided by the bytes per weight, provided the arithmetic keeps up. Widening
 * each weight to fp32 does not keep up on two cores (benchmarks/lowbit_kernels.py),
 * so the inner loops (kernels.h) multiply int8 weights (or int4 codes) by activations
 * quantized to int8 per block of 32. This file is the per-layer entry point that
 * `QuantizedLinear` calls for a few rows at a time; decode.c runs a whole decoding step.
 *
 * Built by lmforge.native with `gcc -O3 -march=native -fopenmp`; loaded with ctypes.
 */
#include <stdlib.h>

#include "kernels.h"

#define MT 4  /* rows of x that share one pass over the weights */

#ifdef __AVX2__
static inline __m256i unpack_int4(const uint8_t *p, __m256i zero) { return _mm256_sub_epi8(nibbles(p), zero); }

/* 32 weights of row n, block b, as signed bytes. `bits` is a constant after inlining. */
static inline __attribute__((always_inline)) __m256i weight_block(int bits, const void *q, size_t n, int b, int K,
                                                                  const uint8_t *zero, int G) {
    if (bits == 8) return _mm256_loadu_si256((const __m256i *)((const int8_t *)q + n * K + b * QK));
    return unpack_int4((const uint8_t *)q + (n * K + b * QK) / 2, _mm256_set1_epi8((char)zero[n * (K / G) + b * QK / G]));
}

static inline __attribute__((always_inline)) float block_scale(int bits, const float *scale, size_t n, int b, int K,
                                                              int G) {
    return bits == 8 ? 1.0f : scale[n * (K / G) + b * QK / G];
}

/* Threads only pay off on layers big enough to amortize waking them (and a busy machine
 * makes every parallel region wait for its slowest thread). */
#define PARALLEL_MIN (1 << 18)

/* Small batches: MT rows of x (zero-padded) against one row of W. */
static inline __attribute__((always_inline)) void tile_MTx1(int bits, const int8_t *xq, const float *xs, int K,
                                                            const void *q, const float *scale, const uint8_t *zero,
                                                            int G, size_t n, float *out) {
    __m256 acc[MT];
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    for (int b = 0; b < K / QK; b++) {
        __m256i w = weight_block(bits, q, n, b, K, zero, G);
        float ws = block_scale(bits, scale, n, b, K, G);
        for (int m = 0; m < MT; m++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * K + b * QK));
            __m256 d = _mm256_set1_ps(xs[m * (K / QK) + b] * ws);
            acc[m] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot32(w, a)), acc[m]);
        }
    }
    for (int m = 0; m < MT; m++) out[m] = hsum(acc[m]);
}

/* The activations' layout (kernels.h) for `rows` rows: one int4 row takes the row kernel's. */
static int layout(int bits, int rows, int G) { return bits == 4 && rows == 1 ? q4_unit(G) : QK; }

static void run(int bits, const int8_t *xq, const float *xs, int rows, int K, const void *q, const float *scale,
                const uint8_t *zero, int G, int N, float *out /* (rows, N) */) {
    int parallel = (size_t)N * K >= PARALLEL_MIN;
    if (rows == 1) {
        float *gsum = NULL, *xw = NULL;
        const int U = layout(bits, 1, G);
        if (bits == 4) {
            gsum = malloc(sizeof(float) * (K / G));
            xw = malloc(sizeof(float) * (K / 8));
            group_sums(xq, xs, K, G, U, gsum, xw);
        }
#pragma omp parallel for schedule(dynamic, 32) if (parallel)
        for (int n = 0; n < N; n++) {
            if (bits == 8) out[n] = q8_row(xq, xs, K, (const int8_t *)q + (size_t)n * K);
            else out[n] = q4_row(xq, xs, xw, gsum, K, (const uint8_t *)q + (size_t)n * K / 2, scale + (size_t)n * (K / G),
                                 zero + (size_t)n * (K / G), G, U);
        }
        free(gsum);
        free(xw);
        return;
    }
#pragma omp parallel for schedule(dynamic, 8) if (parallel)
    for (int n = 0; n < N; n++) {
        float o[MT];
        if (bits == 8) tile_MTx1(8, xq, xs, K, q, scale, zero, G, n, o);
        else tile_MTx1(4, xq, xs, K, q, scale, zero, G, n, o);
        for (int m = 0; m < rows; m++) out[(size_t)m * N + n] = o[m];
    }
}
#else
static int layout(int bits, int rows, int G) { return (void)bits, (void)rows, (void)G, QK; }

static void run(int bits, const int8_t *xq, const float *xs, int rows, int K, const void *q, const float *scale,
                const uint8_t *zero, int G, int N, float *out) {
    int blocks = K / QK;
    for (int m = 0; m < rows; m++)
        for (int n = 0; n < N; n++) {
            float s = 0.0f;
            for (int b = 0; b < blocks; b++) {
                int32_t d = 0;
                for (int j = 0; j < QK; j++) {
                    int k = b * QK + j, w;
                    if (bits == 8) {
                        w = ((const int8_t *)q)[(size_t)n * K + k];
                    } else {
                        uint8_t byte = ((const uint8_t *)q)[((size_t)n * K + b * QK) / 2 + j % (QK / 2)];
                        w = (j < QK / 2 ? byte & 15 : byte >> 4) - zero[(size_t)n * (K / G) + k / G];
                    }
                    d += w * xq[(size_t)m * K + k];
                }
                s += xs[m * blocks + b] * (bits == 8 ? 1.0f : scale[(size_t)n * (K / G) + b * QK / G]) * (float)d;
            }
            out[(size_t)m * N + n] = s;
        }
}
#endif

/* bits 8: q int8 (N, K), scale (N,);  bits 4: q packed (N, K/2), scale/zero (N, K/G). K % 32 == 0. */
void qlinear(int bits, const float *x, int M, int K, const void *q, const float *scale, const uint8_t *zero,
             int G, int N, const float *bias, float *y) {
    int8_t *xq = calloc((size_t)MT * K, 1);
    float *xs = calloc((size_t)MT * (K / QK), sizeof(float));
    float *out = malloc(sizeof(float) * MT * N);
    for (int m0 = 0; m0 < M; m0 += MT) {
        int rows = M - m0 < MT ? M - m0 : MT;
        quantize_rows(x + (size_t)m0 * K, rows, K, layout(bits, rows, G), xq, xs);
        run(bits, xq, xs, rows, K, q, scale, zero, G, N, out);
        for (int m = 0; m < rows; m++)
            for (int n = 0; n < N; n++)
                y[(size_t)(m0 + m) * N + n] = out[(size_t)m * N + n] * (bits == 8 ? scale[n] : 1.0f) + (bias ? bias[n] : 0.0f);
    }
    free(xq);
    free(xs);
    free(out);
}

/* The fp32 weight (N, K), for large batches where a BLAS matmul beats the mat-vec loops. */
void dequant(int bits, const void *q, const float *scale, const uint8_t *zero, int G, int N, int K, float *w) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *row = w + (size_t)n * K;
        if (bits == 8) {
            const int8_t *qn = (const int8_t *)q + (size_t)n * K;
            for (int k = 0; k < K; k++) row[k] = scale[n] * (float)qn[k];
            continue;
        }
        const uint8_t *qn = (const uint8_t *)q + (size_t)n * K / 2;
        for (int k = 0; k < K; k += QK) {
            size_t g = (size_t)n * (K / G) + k / G;
            float s = scale[g], z = (float)zero[g];
            for (int j = 0; j < QK / 2; j++) {
                row[k + j] = s * ((float)(qn[k / 2 + j] & 15) - z);
                row[k + j + QK / 2] = s * ((float)(qn[k / 2 + j] >> 4) - z);
            }
        }
    }
}
