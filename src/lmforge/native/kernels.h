/* The inner loops shared by the per-call matmuls (qmatmul.c) and the whole-step decoder
 * (decode.c): one row of activations against one row of a weight matrix, for fp32, int8
 * and int4 weights.
 *
 * Quantized weights meet int8 activations: each call quantizes x in blocks of 32 with one
 * fp32 scale per block (as llama.cpp does), so the inner loop is an int8 dot product
 * (AVX-VNNI `vpdpbusd` where present, else AVX2 `vpmaddubsw`) and no fp32 copy of the
 * weight is ever made.
 *
 * int8: q (N, K) int8, one fp32 scale per output row, applied by the caller.
 * int4: groups of G (a multiple of 32) along K, zero points: W[n,k] = scale[n,g] * (q - zero[n,g]),
 *       q in 0..15; each run of 32 weights is 16 bytes, byte j = q[j] | q[j+16] << 4.
 */
#ifndef LMFORGE_KERNELS_H
#define LMFORGE_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK 32 /* activation block */

#ifdef __AVX2__
/* The largest of eight floats. */
static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* The sum of 32 signed bytes. */
static inline int32_t bytes_sum(__m256i v) {
    const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), v), _mm256_set1_epi16(1));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}
#endif

/* x (M, K) fp32 -> xq (M, K) int8 and xs (M, K/32) fp32, symmetric per block. Every matmul
 * input of a decoding step passes through here, so it is vectorized where the matmuls are;
 * both versions round half to even (lrintf, vcvtps2dq) and give the same bytes. */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *xs) {
    for (size_t b = 0; b < (size_t)M * K / QK; b++) {
        const float *v = x + b * QK;
#ifdef __AVX2__
        const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
                     v3 = _mm256_loadu_ps(v + 24);
        const float amax = hmax(_mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, mask), _mm256_and_ps(v1, mask)),
                                              _mm256_max_ps(_mm256_and_ps(v2, mask), _mm256_and_ps(v3, mask))));
        const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        xs[b] = d;
        const __m256 s = _mm256_set1_ps(inv);
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, s)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, s)),
                      i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, s)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, s));
        /* the packs work within 128-bit lanes: a final permutation puts the 32 bytes in order */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(xq + b * QK), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        xs[b] = d;
        for (int j = 0; j < QK; j++) xq[b * QK + j] = (int8_t)lrintf(v[j] * inv);
#endif
    }
}

/* Per int4 group g of one quantized row: sum_k x[k] over the group, in the quantized
 * activations' own values (what the zero-point correction multiplies). */
static void group_sums(const int8_t *xq, const float *xs, int K, int G, float *gsum) {
    for (int g = 0; g < K / G; g++) gsum[g] = 0.0f;
    for (int b = 0; b < K / QK; b++) {
#ifdef __AVX2__
        const int32_t s = bytes_sum(_mm256_loadu_si256((const __m256i *)(xq + b * QK)));
#else
        int32_t s = 0;
        for (int j = 0; j < QK; j++) s += xq[b * QK + j];
#endif
        gsum[b * QK / G] += xs[b] * (float)s;
    }
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* [sum a, sum b, sum c, sum d] for four 8-float vectors. */
static inline __m128 hsum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* e^x for eight floats: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n
 * through the exponent bits (relative error ~2e-7, like expf; inputs clamped to +-88). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#define GELU_C 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_A 0.044715f

/* GELU (tanh form) as x * s, s = sigmoid(2z) = (1 + tanh z) / 2 with
 * z = sqrt(2/pi) (x + 0.044715 x^3): s for eight floats and for one. */
static inline __m256 gelu_sigmoid(__m256 x) {
    const __m256 z = _mm256_mul_ps(_mm256_set1_ps(-2.0f * GELU_C),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(GELU_A), x), _mm256_mul_ps(x, x), x));
    return _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(z)));
}

static inline float gelu_sigmoid1(float x) { return 1.0f / (1.0f + expf(-2.0f * GELU_C * (x + GELU_A * x * x * x))); }

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

/* The same with unsigned u (int4 codes 0..15), which is what vpdpbusd / vpmaddubsw take. */
static inline __m256i udot32(__m256i u, __m256i a) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, a);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, a);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1));
#endif
}

/* 32 int4 codes (16 bytes) as unsigned bytes, in order. */
static inline __m256i nibbles(const uint8_t *p) {
    __m128i b = _mm_loadu_si128((const __m128i *)p), low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
}

/* The row kernels take one weight row at a time: with 256-bit products, tiles of 2 or 4
 * rows sharing each activation load ran slower than one row with independent accumulators
 * along K (benchmarks/lowbit_kernels.py's shapes, one thread). (decode_avx512.h's VNNI
 * tiles, 512-bit products over two blocks at once, are faster than these rows and replace
 * them in decoding where the CPU has them.) */

/* W[n] . x for fp32 W (N, K), any K. */
static inline float f32_row(const float *x, int K, const float *w) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += w[k] * x[k];
    return s;
}

/* sum over blocks b of xs[b] * (q . xq)[b] for one int8 row q (K,); K % 32 == 0. The
 * per-row weight scale is left to the caller. Two accumulators hide the FMA latency. */
static inline float q8_row(const int8_t *xq, const float *xs, int K, const int8_t *q) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    const int blocks = K / QK;
    int b = 0;
    for (; b + 2 <= blocks; b += 2) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + b * QK + QK));
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + b * QK));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + b * QK + QK));
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(xs[b]), _mm256_cvtepi32_ps(dot32(w0, x0)), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(xs[b + 1]), _mm256_cvtepi32_ps(dot32(w1, x1)), a1);
    }
    if (b < blocks) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + b * QK));
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(xs[b]), _mm256_cvtepi32_ps(dot32(w0, x0)), a0);
    }
    return hsum(_mm256_add_ps(a0, a1));
}

/* One int4 row (codes q (K/2,), scale and zero (K/G,)), fully scaled. The codes are
 * unsigned, so the zero point leaves the inner loop: sum_k s*(q-z)*x = s*sum_k q*x -
 * s*z*sum_k x, the last sum being gsum[g] (group_sums). G is a multiple of 32; the inner
 * loop takes two runs of 32 codes (32 bytes) per load when G allows. */
static inline float q4_row(const int8_t *xq, const float *xs, const float *gsum, int K, const uint8_t *q,
                           const float *scale, const uint8_t *zero, int G) {
    const int groups = K / G, per_group = G / QK;
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.0f;
    for (int g = 0; g < groups; g++) {
        __m256 g0 = _mm256_setzero_ps(), g1 = g0;
        int b = g * per_group;
        const int end = b + per_group;
        for (; b + 2 <= end; b += 2) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(q + b * QK / 2));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            /* run b is the low 16 bytes: codes lo[0..15] then hi[0..15]; run b+1 the high 16 */
            __m256i u0 = _mm256_permute2x128_si256(lo, hi, 0x20), u1 = _mm256_permute2x128_si256(lo, hi, 0x31);
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + b * QK + QK));
            g0 = _mm256_fmadd_ps(_mm256_set1_ps(xs[b]), _mm256_cvtepi32_ps(udot32(u0, x0)), g0);
            g1 = _mm256_fmadd_ps(_mm256_set1_ps(xs[b + 1]), _mm256_cvtepi32_ps(udot32(u1, x1)), g1);
        }
        if (b < end) { /* G an odd multiple of 32 */
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
            g0 = _mm256_fmadd_ps(_mm256_set1_ps(xs[b]), _mm256_cvtepi32_ps(udot32(nibbles(q + b * QK / 2), x0)), g0);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(scale[g]), _mm256_add_ps(g0, g1), acc);
        corr += scale[g] * (float)zero[g] * gsum[g];
    }
    return hsum(acc) - corr;
}
#endif /* __AVX2__ */
#endif
