/* Low-bit matmuls for CPU decoding: y = x @ W^T (+ bias), x fp32 (M, K), M small.
 *
 * Batch-1 decoding reads every weight once per token, so its speed is the memory
 * bandwidth divided by the bytes per weight, provided the arithmetic keeps up. Widening
 * each weight to fp32 does not keep up on two cores (benchmarks/kernels.py measured it),
 * so, as llama.cpp does, each call quantizes x to int8 in blocks of 32 (one fp32 scale
 * per block) and the inner loop is an int8 x int8 dot product (AVX-VNNI `vpdpbusd`
 * where present, else AVX2 `vpmaddubsw`), scaled once per block. No fp32 copy of the
 * weight is ever written.
 *
 * int8: q (N, K) int8, one fp32 scale per output row:          W[n,k] = scale[n] * q[n,k]
 * int4: groups of G (a multiple of 32) along K, zero points:   W[n,k] = scale[n,g] * (q - zero[n,g]),
 *       q in 0..15; each run of 32 weights is 16 bytes, byte j = q[j] | q[j+16] << 4.
 *
 * Built by lmforge.compress.native with `gcc -O3 -march=native -fopenmp`; loaded with ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK 32 /* activation block */
#define MT 4  /* rows of x that share one pass over the weights */

/* x (M, K) fp32 -> xq (M, K) int8 and xs (M, K/32) fp32, symmetric per block. */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *xs) {
    for (size_t b = 0; b < (size_t)M * K / QK; b++) {
        const float *v = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        xs[b] = d;
        for (int j = 0; j < QK; j++) xq[b * QK + j] = (int8_t)lrintf(v[j] * inv);
    }
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Eight int32 partial sums of w . a over 32 signed bytes (|w| <= 127 so no overflow). */
static inline __m256i dot32(__m256i w, __m256i a) {
    __m256i aw = _mm256_sign_epi8(w, w), sa = _mm256_sign_epi8(a, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sa);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sa);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), _mm256_set1_epi16(1));
#endif
}

static inline __m256i unpack_int4(const uint8_t *p, __m256i zero) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i low = _mm_set1_epi8(0x0F);
    __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
    return _mm256_sub_epi8(q, zero);
}

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

/* Decoding: one row of x against NR rows of W, NR independent accumulators. */
#define NR 4
static inline __attribute__((always_inline)) void tile_1xNR(int bits, const int8_t *xq, const float *xs, int K,
                                                            const void *q, const float *scale, const uint8_t *zero,
                                                            int G, size_t n, float *out) {
    __m256 acc[NR];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < K / QK; b++) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        for (int r = 0; r < NR; r++) {
            __m256i w = weight_block(bits, q, n + r, b, K, zero, G);
            __m256 d = _mm256_set1_ps(xs[b] * block_scale(bits, scale, n + r, b, K, G));
            acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot32(w, a)), acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) out[r] = hsum(acc[r]);
}

/* int4 decoding. Codes 0..15 are unsigned, which is what vpdpbusd / vpmaddubsw take, so the
 * zero point leaves the inner loop: sum_k s*(q-z)*x = s*sum_k q*x - s*z*sum_k x, the last
 * sum being `gsum[g]` (the quantized activations of group g, computed once per call). The
 * per-block activation scale is shared by all rows, the weight scale applied per group. */
static inline __m256i udot32(__m256i u, __m256i a) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, a);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, a);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1));
#endif
}

static inline void q4_tile_1xNR(const int8_t *xq, const float *xs, const float *gsum, int K, const uint8_t *q,
                                const float *scale, const uint8_t *zero, int G, size_t n, float *out) {
    const int groups = K / G, per_group = G / QK;
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 acc[NR];
    float corr[NR] = {0};
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256 gacc[NR];
        for (int r = 0; r < NR; r++) gacc[r] = _mm256_setzero_ps();
        for (int b = g * per_group; b < (g + 1) * per_group; b++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
            __m256 d = _mm256_set1_ps(xs[b]);
            for (int r = 0; r < NR; r++) {
                __m128i v = _mm_loadu_si128((const __m128i *)(q + ((n + r) * K + b * QK) / 2));
                __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
                gacc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(udot32(u, a)), gacc[r]);
            }
        }
        for (int r = 0; r < NR; r++) {
            size_t i = (n + r) * groups + g;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale[i]), gacc[r], acc[r]);
            corr[r] += scale[i] * (float)zero[i] * gsum[g];
        }
    }
    for (int r = 0; r < NR; r++) out[r] = hsum(acc[r]) - corr[r];
}

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

static void run(int bits, const int8_t *xq, const float *xs, int rows, int K, const void *q, const float *scale,
                const uint8_t *zero, int G, int N, float *out /* (rows, N) */) {
    int parallel = (size_t)N * K >= PARALLEL_MIN;
    if (rows == 1) {
        float *gsum = NULL;
        if (bits == 4) {
            gsum = calloc(K / G, sizeof(float));
            for (int b = 0; b < K / QK; b++) {
                int32_t s = 0;
                for (int j = 0; j < QK; j++) s += xq[b * QK + j];
                gsum[b * QK / G] += xs[b] * (float)s;
            }
        }
#pragma omp parallel for schedule(dynamic, 8) if (parallel)
        for (int n = 0; n < N - N % NR; n += NR) {
            if (bits == 8) tile_1xNR(8, xq, xs, K, q, scale, zero, G, n, out + n);
            else q4_tile_1xNR(xq, xs, gsum, K, (const uint8_t *)q, scale, zero, G, n, out + n);
        }
        free(gsum);
        for (int n = N - N % NR; n < N; n++) {  /* leftover rows: a padded tile would read past W */
            float o[MT];
            if (bits == 8) tile_MTx1(8, xq, xs, K, q, scale, zero, G, n, o);
            else tile_MTx1(4, xq, xs, K, q, scale, zero, G, n, o);
            out[n] = o[0];
        }
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
        quantize_rows(x + (size_t)m0 * K, rows, K, xq, xs);
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
