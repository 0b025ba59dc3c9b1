/* Low-bit matmuls: y = x @ W^T (+ bias), x fp32 (M, K): `qlinear` for a few rows (decoding),
 * `qgemm` for many (a prompt; below).
 *
 * Batch-1 decoding reads every weight once per token, so its speed is the memory
 * bandwidth divided by the bytes per weight, provided the arithmetic keeps up. Widening
 * each weight to fp32 does not keep up on two cores (benchmarks/lowbit_kernels.py),
 * so the inner loops (kernels.h) multiply int8 weights (or int4 codes) by activations
 * quantized to int8 per block of 32. This file is the per-layer entry point that
 * `QuantizedLinear` calls; decode.c runs a whole decoding step.
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

/* ----------------------------------------------------------------------------------------
 * Many rows (a prompt): the integer GEMM.
 *
 * The same math as qlinear (activations quantized per block of 32, int8 products, per-block
 * scales), arranged so that the weight is read once per call instead of once per MT rows:
 * a panel of weight rows stays in L2 while every row of x passes over it, RM rows at a time,
 * in register tiles where each loaded weight vector meets RM activation vectors (each
 * activation vector RN weight vectors). K is cut into passes of GEMM_KC columns, and the rows
 * into chunks whose quantized activations for one pass fit GEMM_L2 bytes.
 *
 * int8: the activations go in as unsigned bytes (x + 128), what vpdpbusd multiplies by the
 * signed weights; each 32-bit lane then starts from -128 * (its four weights' sum), which
 * takes the offset back out exactly. AVX2 (vpmaddubsw saturates at int16 with x + 128) uses the
 * row kernels' sign trick instead. int4: the codes are the unsigned operand already, and the
 * activations come in layout 128 (kernels.h: a 64-byte load of codes meets a unit of 128
 * columns through its low and its high nibbles); the zero points leave the loop as in
 * q4_row (scale * zero * the group's activation sum, subtracted once).
 * ---------------------------------------------------------------------------------------- */

#define GEMM_KC 2048           /* columns of K per pass: a multiple of 128 */
#define GEMM_L2 (384 << 10)    /* bytes of prepared activations per chunk of rows */

/* Tiles: rows of x by weight rows (RM8 x RN8 for int8, RM4 x RN4 for int4), as many as the
 * accumulators and the weight registers leave room for (32 zmm, 16 ymm). */
#define GEMM_RM 8 /* the largest tile, for the arrays */
#define GEMM_RN 4
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define GEMM 1
#define RM8 4
#define RN8 4
#define RM4 4
#define RN4 4
#elif defined(__AVX2__)
#define GEMM 1
#define RM8 4
#define RN8 2
#define RM4 3
#define RN4 2
#endif

/* Whether qgemm takes this layer: int8 with K % 64 == 0; int4 with K % 128 == 0 and groups
 * that tile the 128-column units (G a multiple of 128, or 32 or 64). Not on AVX-512 without
 * VNNI, where an fp32 matmul in 512-bit registers outruns the 256-bit integer tiles. */
int qgemm_supported(int bits, int K, int G) {
#if defined(GEMM) && !(defined(__AVX512F__) && !defined(__AVX512VNNI__))
    if (bits == 8) return K > 0 && K % 64 == 0;
    if (bits == 4) return K > 0 && K % 128 == 0 && G > 0 && (G % 128 == 0 || G == 32 || G == 64) && K % G == 0;
#endif
    (void)bits, (void)K, (void)G;
    return 0;
}

#ifdef GEMM
/* The activations of a chunk of rows, ready for the tiles. */
typedef struct {
    int8_t *xq;  /* (rows, K): int8 layout QK (int4: layout 128); AVX-512 int8: x + 128 */
    float *xs;   /* (rows, K/32) block scales */
    float *xw;   /* per-lane block scales: AVX-512 int8 (rows, K/4); int4 (rows, K/8) (group_sums) */
    float *gsum; /* int4: (rows, K/G) group sums of the quantized activations */
} gemm_rows;

static void gemm_prepare(int bits, const float *x, int rows, int K, int G, gemm_rows *a) {
    quantize_rows(x, rows, K, bits == 4 ? 128 : QK, a->xq, a->xs);
    for (int m = 0; m < rows; m++) {
        if (bits == 4) {
            group_sums(a->xq + (size_t)m * K, a->xs + (size_t)m * (K / QK), K, G, 128, a->gsum + (size_t)m * (K / G),
                       a->xw + (size_t)m * (K / 8));
            continue;
        }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        uint8_t *u = (uint8_t *)a->xq + (size_t)m * K;
        for (int k = 0; k < K; k += 64)
            _mm512_storeu_si512(u + k, _mm512_xor_si512(_mm512_loadu_si512(u + k), _mm512_set1_epi8((char)0x80)));
        float *w = a->xw + (size_t)m * (K / 4);
        for (int b = 0; b < K / QK; b++) _mm256_storeu_ps(w + 8 * b, _mm256_set1_ps(a->xs[(size_t)m * (K / QK) + b]));
#endif
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* Loads an activation vector once: left alone, the compiler folds it into every product's
 * memory operand, RN loads instead of one, and the tiles wait on the load ports. */
#define IN_REGISTER(v) __asm__("" : "+v"(v))

/* The weight scales of the four blocks of unit u, lane by lane (block i in lanes 4i..4i+3). */
static inline __m512 unit_scales(const float *scale, int u, int G, int group) {
    if (G >= 128) return _mm512_set1_ps(scale[group]);
    if (G == 64)
        return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(scale[2 * u])), _mm256_set1_ps(scale[2 * u + 1]), 1);
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(_mm_loadu_ps(scale + 4 * u)));
}

typedef __m512 gemm_acc;
static inline float gemm_sum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* [sum a, sum b, sum c, sum d] of four 16-float vectors. */
#define GEMM_SUM4
static inline __m128 gemm_sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
#define HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    return hsum4x8(HALVES(a), HALVES(b), HALVES(c), HALVES(d));
#undef HALVES
}

/* acc[i][j] over columns [k0, k1) of rows a[i] against weight rows w[j]. */
static inline __attribute__((always_inline)) void q8_tile(int RM, int RN, const gemm_rows *x, const size_t *m, int K, const int8_t *q,
                                                          const size_t *n, int k0, int k1, __m512 acc[GEMM_RM][GEMM_RN]) {
    const __m512i offset = _mm512_set1_epi8((char)0x80);
    for (int k = k0; k < k1; k += 64) {
        __m512i w[GEMM_RN], c[GEMM_RN];
        for (int j = 0; j < RN; j++) {
            w[j] = _mm512_loadu_si512(q + n[j] * K + k);
            c[j] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, w[j]));
        }
        for (int i = 0; i < RM; i++) {
            __m512i a = _mm512_loadu_si512(x->xq + m[i] * K + k);
            __m512 s = _mm512_loadu_ps(x->xw + m[i] * (K / 4) + k / 4);
            IN_REGISTER(a);
            IN_REGISTER(s);
            for (int j = 0; j < RN; j++)
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c[j], a, w[j])), s, acc[i][j]);
        }
    }
}

static inline __attribute__((always_inline)) void q4_tile(int RM, int RN, const gemm_rows *x, const size_t *m, int K, const uint8_t *q,
                                                          const float *scale, int G, const size_t *n, int k0, int k1,
                                                          __m512 acc[GEMM_RM][GEMM_RN]) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int per_group = G >= 128 ? G / 128 : 1, shift = group_shift(per_group);
    for (int u = k0 / 128; u < k1 / 128; u++) {
        const int group = group_of(u, per_group, shift); /* G >= 128: the unit's group */
        __m512i lo[GEMM_RN], hi[GEMM_RN];
        __m512 sw[GEMM_RN];
        for (int j = 0; j < RN; j++) {
            const __m512i v = _mm512_loadu_si512(q + n[j] * (K / 2) + (size_t)u * 64);
            lo[j] = _mm512_and_si512(v, low);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            sw[j] = unit_scales(scale + n[j] * (K / G), u, G, group);
        }
        for (int i = 0; i < RM; i++) {
            const int8_t *a = x->xq + m[i] * K + (size_t)u * 128;
            __m512i a0 = _mm512_loadu_si512(a), a1 = _mm512_loadu_si512(a + 64);
            __m512 s = _mm512_loadu_ps(x->xw + m[i] * (K / 8) + (size_t)u * 16);
            IN_REGISTER(a0);
            IN_REGISTER(a1);
            IN_REGISTER(s);
            for (int j = 0; j < RN; j++) {
                const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], a0), hi[j], a1);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, sw[j]), acc[i][j]);
            }
        }
    }
}

/* acc[i][j] -= sum_g scale * zero * gsum: the zero points, sixteen groups at a time. */
static inline __attribute__((always_inline)) void q4_zero_points(int RM, int RN, const gemm_rows *x, const size_t *m, int K,
                                                                 const float *scale, const uint8_t *zero, int G,
                                                                 const size_t *n, __m512 acc[GEMM_RM][GEMM_RN]) {
    const int groups = K / G;
    for (int g = 0; g < groups; g += 16) {
        const __mmask16 k = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        __m512 sz[GEMM_RN];
        for (int j = 0; j < RN; j++) {
            const size_t row = n[j] * (size_t)groups + g;
            sz[j] = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, scale + row),
                                  _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, zero + row))));
        }
        for (int i = 0; i < RM; i++) {
            const __m512 s = _mm512_maskz_loadu_ps(k, x->gsum + m[i] * groups + g);
            for (int j = 0; j < RN; j++) acc[i][j] = _mm512_fnmadd_ps(sz[j], s, acc[i][j]);
        }
    }
}
#define GEMM_ZERO _mm512_setzero_ps()
#else /* AVX2 */
typedef __m256 gemm_acc;
static inline float gemm_sum(__m256 v) { return hsum(v); }

/* dot32 with the weights' signs already moved onto the activations: |w| . sign(a, w). */
static inline __m256i sdot32(__m256i aw, __m256i sa) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sa);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), _mm256_set1_epi16(1));
#endif
}

static inline __attribute__((always_inline)) void q8_tile(int RM, int RN, const gemm_rows *x, const size_t *m, int K, const int8_t *q,
                                                          const size_t *n, int k0, int k1, __m256 acc[GEMM_RM][GEMM_RN]) {
    for (int b = k0 / QK; b < k1 / QK; b++) {
        __m256i w[GEMM_RN], aw[GEMM_RN];
        for (int j = 0; j < RN; j++) {
            w[j] = _mm256_loadu_si256((const __m256i *)(q + n[j] * K + (size_t)b * QK));
            aw[j] = _mm256_sign_epi8(w[j], w[j]);
        }
        for (int i = 0; i < RM; i++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(x->xq + m[i] * K + (size_t)b * QK));
            const __m256 s = _mm256_broadcast_ss(x->xs + m[i] * (K / QK) + b);
            for (int j = 0; j < RN; j++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sdot32(aw[j], _mm256_sign_epi8(a, w[j]))), s, acc[i][j]);
        }
    }
}

/* The weight scales of blocks 2h, 2h+1 of unit u (block in lanes 0-3, the next in 4-7). */
static inline __m256 half_unit_scales(const float *scale, int u, int h, int G, int group) {
    if (G >= 128) return _mm256_set1_ps(scale[group]);
    if (G == 64) return _mm256_set1_ps(scale[2 * u + h]);
    return _mm256_set_m128(_mm_set1_ps(scale[4 * u + 2 * h + 1]), _mm_set1_ps(scale[4 * u + 2 * h]));
}

static inline __attribute__((always_inline)) void q4_tile(int RM, int RN, const gemm_rows *x, const size_t *m, int K, const uint8_t *q,
                                                          const float *scale, int G, const size_t *n, int k0, int k1,
                                                          __m256 acc[GEMM_RM][GEMM_RN]) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const int per_group = G >= 128 ? G / 128 : 1, shift = group_shift(per_group);
    for (int u = k0 / 128; u < k1 / 128; u++)
        for (int h = 0; h < 2; h++) {
            const int group = group_of(u, per_group, shift); /* G >= 128: the unit's group */
            __m256i lo[GEMM_RN], hi[GEMM_RN];
            __m256 sw[GEMM_RN];
            for (int j = 0; j < RN; j++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(q + n[j] * (K / 2) + (size_t)u * 64 + 32 * h));
                lo[j] = _mm256_and_si256(v, low);
                hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                sw[j] = half_unit_scales(scale + n[j] * (K / G), u, h, G, group);
            }
            for (int i = 0; i < RM; i++) {
                const int8_t *a = x->xq + m[i] * K + (size_t)u * 128 + 32 * h;
                const __m256i a0 = _mm256_loadu_si256((const __m256i *)a), a1 = _mm256_loadu_si256((const __m256i *)(a + 64));
                const __m256 s = _mm256_loadu_ps(x->xw + m[i] * (K / 8) + (size_t)u * 16 + 8 * h);
                for (int j = 0; j < RN; j++)
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(udot2x32(lo[j], a0, hi[j], a1)), _mm256_mul_ps(s, sw[j]),
                                                acc[i][j]);
            }
        }
}

static inline __attribute__((always_inline)) void q4_zero_points(int RM, int RN, const gemm_rows *x, const size_t *m, int K,
                                                                 const float *scale, const uint8_t *zero, int G,
                                                                 const size_t *n, __m256 acc[GEMM_RM][GEMM_RN]) {
    const int groups = K / G;
    for (int j = 0; j < RN; j++) {
        const float *sc = scale + n[j] * groups;
        const uint8_t *z = zero + n[j] * groups;
        for (int i = 0; i < RM; i++) {
            /* into lane 0: the accumulator's lanes are summed in the end */
            const float c = zero_share(sc, z, x->gsum + m[i] * groups, groups);
            acc[i][j] = _mm256_sub_ps(acc[i][j], _mm256_setr_ps(c, 0, 0, 0, 0, 0, 0, 0));
        }
    }
}
#define GEMM_ZERO _mm256_setzero_ps()
#endif

/* One tile: rows m0.. (clamped to M-1: the repeated rows are computed and not stored) of the
 * chunk against weight rows n0.., columns [k0, k1); the first pass over K stores (with the
 * bias and the int4 zero points), the later ones add. */
static inline __attribute__((always_inline)) void gemm_tile(int bits, int RM, int RN, const gemm_rows *x, int rows, int m0, int K,
                                                            const void *q, const float *scale, const uint8_t *zero,
                                                            int G, int N, int n0, int k0, int k1, const float *bias,
                                                            float *y) {
    size_t m[GEMM_RM], n[GEMM_RN];
    for (int i = 0; i < RM; i++) m[i] = (size_t)(m0 + i < rows ? m0 + i : rows - 1);
    for (int j = 0; j < RN; j++) n[j] = (size_t)(n0 + j < N ? n0 + j : N - 1);
    gemm_acc acc[GEMM_RM][GEMM_RN];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = GEMM_ZERO;
    if (bits == 8) {
        q8_tile(RM, RN, x, m, K, (const int8_t *)q, n, k0, k1, acc);
    } else {
        q4_tile(RM, RN, x, m, K, (const uint8_t *)q, scale, G, n, k0, k1, acc);
        if (k0 == 0) q4_zero_points(RM, RN, x, m, K, scale, zero, G, n, acc);
    }
#ifdef GEMM_SUM4
    if (RN == 4 && n0 + 4 <= N) { /* four sums at once: a short K leaves the reductions a large share */
        const __m128 s = bits == 8 ? _mm_loadu_ps(scale + n0) : _mm_set1_ps(1.0f);
        const __m128 b = bias ? _mm_loadu_ps(bias + n0) : _mm_setzero_ps();
        for (int i = 0; i < RM && m0 + i < rows; i++) {
            float *out = y + (size_t)(m0 + i) * N + n0;
            const __m128 v = _mm_mul_ps(gemm_sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]), s);
            _mm_storeu_ps(out, _mm_add_ps(v, k0 == 0 ? b : _mm_loadu_ps(out)));
        }
        return;
    }
#endif
    for (int i = 0; i < RM && m0 + i < rows; i++)
        for (int j = 0; j < RN && n0 + j < N; j++) {
            float v = gemm_sum(acc[i][j]) * (bits == 8 ? scale[n0 + j] : 1.0f), *out = y + (size_t)(m0 + i) * N + n0 + j;
            *out = k0 == 0 ? v + (bias ? bias[n0 + j] : 0.0f) : *out + v;
        }
}

/* The tiles of one pass over columns [k0, k1): a panel of GEMM_PANEL weight rows (in L2)
 * meets one row tile at a time (its activations stay in L1), so that neither operand streams
 * from farther out once per tile. */
#define GEMM_PANEL 64
#define GEMM_PASS(bits, RM, RN)                                                                           \
    for (int m0 = 0; m0 < rows; m0 += (RM))                                                                \
        for (int n0 = p0; n0 < p1; n0 += (RN))                                                             \
            gemm_tile(bits, RM, RN, x, rows, m0, K, q, scale, zero, G, N, n0, k0, k1, bias, y)

static void gemm_chunk(int bits, const gemm_rows *x, int rows, int K, const void *q, const float *scale,
                       const uint8_t *zero, int G, int N, const float *bias, float *y, int parallel) {
    const int panels = (N + GEMM_PANEL - 1) / GEMM_PANEL;
    for (int k0 = 0; k0 < K; k0 += GEMM_KC) {
        const int k1 = K - k0 < GEMM_KC ? K : k0 + GEMM_KC;
#pragma omp parallel for schedule(static) if (parallel)
        for (int p = 0; p < panels; p++) {
            const int p0 = p * GEMM_PANEL, p1 = p0 + GEMM_PANEL < N ? p0 + GEMM_PANEL : N;
            if (bits == 8) GEMM_PASS(8, RM8, RN8);
            else GEMM_PASS(4, RM4, RN4);
        }
    }
}
#undef GEMM_PASS
#endif

/* y (M, N) = x (M, K) @ W^T (+ bias) for many rows, W as in qlinear; qgemm_supported(bits, K, G)
 * must hold. Returns 0, or -1 where memory ran out (y then unwritten). */
int qgemm(int bits, const float *x, int M, int K, const void *q, const float *scale, const uint8_t *zero, int G,
          int N, const float *bias, float *y) {
    if (!qgemm_supported(bits, K, G)) return -1;
#ifdef GEMM
    /* what one pass over GEMM_KC columns reads of a row's prepared activations */
    const size_t per_row = (size_t)(K < GEMM_KC ? K : GEMM_KC) * 2 + (size_t)(GEMM_KC / QK) * sizeof(float);
    int chunk = (int)(GEMM_L2 / per_row) / 8 * 8;
    chunk = chunk < 32 ? 32 : chunk > M ? M : chunk;
    /* 64-byte aligned, so that no 512-bit load of a row splits across two cache lines */
    gemm_rows a = {aligned_alloc(64, (size_t)chunk * K), malloc(sizeof(float) * chunk * (K / QK)),
                   aligned_alloc(64, sizeof(float) * chunk * (K / 4)),
                   bits == 4 ? malloc(sizeof(float) * chunk * (K / G)) : NULL};
    int ok = a.xq && a.xs && a.xw && (bits == 8 || a.gsum);
    if (ok) {
        const int parallel = (size_t)N * K >= PARALLEL_MIN;
        for (int m0 = 0; m0 < M; m0 += chunk) {
            const int rows = M - m0 < chunk ? M - m0 : chunk;
            gemm_prepare(bits, x + (size_t)m0 * K, rows, K, G, &a);
            gemm_chunk(bits, &a, rows, K, q, scale, zero, G, N, bias, y + (size_t)m0 * N, parallel);
        }
    }
    free(a.xq);
    free(a.xs);
    free(a.xw);
    free(a.gsum);
    return ok ? 0 : -1;
#else
    (void)x, (void)M, (void)q, (void)scale, (void)zero, (void)N, (void)bias, (void)y;
    return -1;
#endif
}
