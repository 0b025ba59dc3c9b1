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

/* The int4 row kernel reads its activations interleaved by units of U columns (64 or 128,
 * the largest that divides the group size): a unit holds the first 16 values of each of its
 * blocks of 32, then their last 16. The codes come in that order already (each block of 32 is
 * 16 bytes, byte j = q[j] | q[j+16] << 4): a 32- or 64-byte load of codes, masked to its low
 * nibbles, meets the unit's first half, shifted to its high nibbles the second, with no
 * shuffle between them, and both products land in int32 lanes of the same blocks. U = QK is
 * the blocks in order, what every other kernel reads. */
static inline int q4_unit(int G) { return G % 128 == 0 ? 128 : G % 64 == 0 ? 64 : QK; }

/* Where block b's first 16 values go in layout U (its last 16 follow U / 2 later). */
static inline size_t unit_offset(int b, int U) { return (size_t)b * QK / U * U + (size_t)(b % (U / QK)) * (QK / 2); }

/* x (M, K) fp32 -> xq (M, K) int8 in layout U and xs (M, K/32) fp32, symmetric per block.
 * Every matmul input of a decoding step passes through here, so it is vectorized where the
 * matmuls are; both versions round half to even (lrintf, vcvtps2dq) and give the same bytes. */
static void quantize_rows(const float *x, int M, int K, int U, int8_t *xq, float *xs) {
    for (size_t b = 0; b < (size_t)M * K / QK; b++) {
        const float *v = x + b * QK;
        int8_t *lo = xq + b / (K / QK) * K + unit_offset((int)(b % (K / QK)), U), *hi = lo + U / 2;
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
        const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)),
                                                      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm_storeu_si128((__m128i *)lo, _mm256_castsi256_si128(p));
        _mm_storeu_si128((__m128i *)hi, _mm256_extracti128_si256(p, 1));
#else
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        xs[b] = d;
        for (int j = 0; j < QK; j++) (j < QK / 2 ? lo : hi - QK / 2)[j] = (int8_t)lrintf(v[j] * inv);
#endif
    }
}

/* Per int4 group g of one quantized row (layout U): sum_k x[k] over the group, in the
 * quantized activations' own values (what the zero-point correction multiplies); and, for
 * the interleaved layouts, each block's scale once per int32 lane of its products (xw, K/8
 * floats: block b's at 4b..4b+3), which the row kernel multiplies lane by lane. */
static void group_sums(const int8_t *xq, const float *xs, int K, int G, int U, float *gsum, float *xw) {
    for (int g = 0; g < K / G; g++) gsum[g] = 0.0f;
    for (int b = 0; b < K / QK; b++) {
        const int8_t *lo = xq + unit_offset(b, U), *hi = lo + U / 2;
#ifdef __AVX2__
        const int32_t s = bytes_sum(_mm256_loadu2_m128i((const __m128i *)hi, (const __m128i *)lo));
#else
        int32_t s = 0;
        for (int j = 0; j < QK / 2; j++) s += lo[j] + hi[j];
#endif
        gsum[b * QK / G] += xs[b] * (float)s;
        if (U > QK)
            for (int j = 0; j < 4; j++) xw[4 * b + j] = xs[b];
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

/* One int4 row (codes q (K/2,), scale and zero (K/G,)) against activations in blocks of 32 in
 * order (layout QK), fully scaled. The codes are unsigned, so the zero point leaves the inner
 * loop: sum_k s*(q-z)*x = s*sum_k q*x - s*z*sum_k x, the last sum being gsum[g] (group_sums).
 * G is a multiple of 32; the inner loop takes two runs of 32 codes (32 bytes) per load when G
 * allows. What the interleaved layouts (q4_row) cannot take: groups of an odd number of blocks. */
static inline float q4_row_blocks(const int8_t *xq, const float *xs, const float *gsum, int K, const uint8_t *q,
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

/* sum over the groups of scale[g] * zero[g] * gsum[g]: the zero points' share of an int4 row. */
static inline float zero_share(const float *scale, const uint8_t *zero, const float *gsum, int groups) {
    __m256 c = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= groups; g += 8) {
        const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zero + g))));
        c = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(scale + g), z), _mm256_loadu_ps(gsum + g), c);
    }
    float s = hsum(c);
    for (; g < groups; g++) s += scale[g] * (float)zero[g] * gsum[g];
    return s;
}

/* Eight int32 lanes of lo . a + hi . c for unsigned codes (lo, hi <= 15) and signed bytes. */
static inline __m256i udot2x32(__m256i lo, __m256i a, __m256i hi, __m256i c) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, a), hi, c);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, a), hi, c);
#else
    /* a pair's sum is at most 2 * 15 * 127 in size: two of them add without leaving int16 */
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, a), _mm256_maddubs_epi16(hi, c)),
                             _mm256_set1_epi16(1));
#endif
}

/* c / d for the blocks' group index in the row kernels' loops, d = per group (> 0): a shift
 * where d is a power of two (every usual group size), as a division would take longer than the
 * block's products. */
static inline int group_shift(int d) { return d & (d - 1) ? -1 : __builtin_ctz((unsigned)d); }
static inline int group_of(int c, int d, int shift) { return shift >= 0 ? c >> shift : c / d; }

/* How far ahead of the codes being read the int4 row kernels fetch: they read row after row
 * of one matrix, one stream, and the hardware prefetcher alone leaves the loads waiting. */
#define ROW_PREFETCH 16384

/* q4_row on layout U (64 or 128) in 256-bit steps of 64 columns (two blocks, 32 bytes of
 * codes): lanes 0-3 hold the first block's sums, 4-7 the second's, and xw scales them so. */
static inline __attribute__((always_inline)) float q4_row_units(const int8_t *xq, const float *xw, const float *gsum,
                                                                int K, const uint8_t *q, const float *scale,
                                                                const uint8_t *zero, int G, int U) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const int pieces = K / 64, per_group = G / 64, shift = group_shift(per_group);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
#define PIECE(c, acc)                                                                                              \
    do {                                                                                                           \
        const int8_t *x = xq + (size_t)(c) * 64 / U * U + (size_t)((c) % (U / 64)) * 32;                           \
        const __m256i v = _mm256_loadu_si256((const __m256i *)(q + (size_t)(c) * 32));                            \
        const __m256i d = udot2x32(_mm256_and_si256(v, low), _mm256_loadu_si256((const __m256i *)x),              \
                                   _mm256_and_si256(_mm256_srli_epi16(v, 4), low),                                 \
                                   _mm256_loadu_si256((const __m256i *)(x + U / 2)));                              \
        const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(xw + (size_t)(c) * 8), _mm256_set1_ps(scale[group_of(c, per_group, shift)])); \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc);                                                      \
    } while (0)
    int c = 0;
    for (; c + 2 <= pieces; c += 2) {
        _mm_prefetch((const char *)(q + (size_t)c * 32 + ROW_PREFETCH), _MM_HINT_T0);
        PIECE(c, a0);
        PIECE(c + 1, a1);
    }
    if (c < pieces) PIECE(c, a0);
#undef PIECE
    return hsum(_mm256_add_ps(a0, a1)) - zero_share(scale, zero, gsum, K / G);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* q4_row on layout 128 in 512-bit steps: 64 bytes of codes are one unit (four blocks), their
 * low nibbles meet its first 64 activations and their high nibbles the next 64 through two
 * vpdpbusd into the same lanes (block i in lanes 4i..4i+3). */
static inline float q4_row_units512(const int8_t *xq, const float *xw, const float *gsum, int K, const uint8_t *q,
                                    const float *scale, const uint8_t *zero, int G) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int groups = K / G, per_group = G / 128, units = K / 128, shift = group_shift(per_group);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
#define UNIT(u, acc)                                                                                         \
    do {                                                                                                     \
        _mm_prefetch((const char *)(q + (size_t)(u) * 64 + ROW_PREFETCH), _MM_HINT_T0);                      \
        const __m512i v = _mm512_loadu_si512(q + (size_t)(u) * 64);                                          \
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, low),                   \
                                        _mm512_loadu_si512(xq + (size_t)(u) * 128));                         \
        d = _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(v, 4), low),                           \
                                _mm512_loadu_si512(xq + (size_t)(u) * 128 + 64));                            \
        const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(xw + (size_t)(u) * 16), _mm512_set1_ps(scale[group_of(u, per_group, shift)])); \
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc);                                                \
    } while (0)
    int u = 0;
    for (; u + 2 <= units; u += 2) {
        UNIT(u, a0);
        UNIT(u + 1, a1);
    }
    if (u < units) UNIT(u, a0);
#undef UNIT
    /* the zero points, 16 groups at a time, join the sum before its one reduction */
    for (int g = 0; g < groups; g += 16) {
        const __mmask16 m = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, zero + g)));
        a1 = _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, scale + g), z), _mm512_maskz_loadu_ps(m, gsum + g), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#endif

/* One int4 row against the activations in layout U (q4_unit, or QK), fully scaled: xs the
 * blocks' scales (layout QK), xw their lane scales (the others; group_sums). */
static inline float q4_row(const int8_t *xq, const float *xs, const float *xw, const float *gsum, int K, const uint8_t *q,
                           const float *scale, const uint8_t *zero, int G, int U) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (U == 128) return q4_row_units512(xq, xw, gsum, K, q, scale, zero, G);
#else
    if (U == 128) return q4_row_units(xq, xw, gsum, K, q, scale, zero, G, 128);
#endif
    if (U == 64) return q4_row_units(xq, xw, gsum, K, q, scale, zero, G, 64);
    return q4_row_blocks(xq, xs, gsum, K, q, scale, zero, G);
}
#endif /* __AVX2__ */
#endif
