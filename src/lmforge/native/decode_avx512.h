/* Part of decode.c, included by it once where the CPU has AVX-512 (decode_avx2.h where it
 * has AVX2 only): the batched matmuls in 512-bit tiles. Builds on decode.c's Linear, Work,
 * Worker, FOR_ITEMS, put, CHUNK_ROWS and lowbit_row, and defines
 * - matvec_f32_batch, the fp32 matmul for a batch (B >= 4);
 * - with AVX-512 VNNI and BW, matvec_lowbit_batch (the int8/int4 matmul in tiles of four
 *   rows) and LOWBIT_TILE, which has decode.c's matvec take it (ROW_KERNEL_BELOW 0: at every
 *   batch size where decode.c's lowbit_tiles says so);
 * - DECODE_ISA, the name decode_isa() reports.
 */
#ifndef LMFORGE_DECODE_AVX512_H
#define LMFORGE_DECODE_AVX512_H

/* [sum a, sum b, sum c, sum d] for four 16-float vectors. */
static inline __m128 hsum4x16(__m512 a, __m512 b, __m512 c, __m512 d) {
#define HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    return hsum4x8(HALVES(a), HALVES(b), HALVES(c), HALVES(d));
#undef HALVES
}

/* Four fp32 weight rows (w) against S <= 4 activation rows (x), over K columns, both with
 * row stride ld: out[4 s + r] = w_r . x_s. Sixteen 16-float accumulators at S = 4 (AVX-512's
 * 32 registers hold them; AVX2's 16 do not, hence decode_avx2.h's 2 x 4 tile), one load per two
 * FMAs. The rows of the next tile (4 ld floats on) are fetched while this one computes.
 * Where a 16-float FMA does twice the work of an 8-float one per cycle, a batched step runs
 * faster with this tile than with the 8-float one (benchmarks/cpu_decode.py). */
static inline __attribute__((always_inline)) void f32_tile4(const float *x, int K, long ld, const float *w, int S,
                                                            float *out) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[4];
        for (int r = 0; r < 4; r++) {
            _mm_prefetch((const char *)(w + (r + 4) * ld + k), _MM_HINT_T0);
            wv[r] = _mm512_maskz_loadu_ps(m, w + r * ld + k);
        }
        for (int s = 0; s < S; s++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + s * ld + k);
            for (int r = 0; r < 4; r++) acc[r][s] = _mm512_fmadd_ps(wv[r], xv, acc[r][s]);
        }
    }
    for (int s = 0; s < S; s++) _mm_storeu_ps(out + 4 * s, hsum4x16(acc[0][s], acc[1][s], acc[2][s], acc[3][s]));
}

/* Columns per pass: 16 activation rows of 512 floats (32 KB) stay in a 48 KB L1 while the
 * weight rows stream past, instead of coming back from L2 for every tile when K is long
 * (a down projection's). */
#define K_BLOCK 512

/* The fp32 matmul for a batch (B >= 4): output rows in fours, activation rows in fours. */
static void matvec_f32_batch(const Linear *L, const float *x, float *y, int B, int accumulate, Worker *wk) {
    const int N = L->N, K = L->K, quads = N / 4, items = (N + CHUNK_ROWS - 1) / CHUNK_ROWS;
    const float *W = (const float *)L->w;
    FOR_ITEMS(wk, item, items) {
        const int end = (item + 1) * CHUNK_ROWS / 4 < quads ? (item + 1) * CHUNK_ROWS / 4 : quads;
        for (int k0 = 0; k0 < K; k0 += K_BLOCK) {
            const int len = K - k0 < K_BLOCK ? K - k0 : K_BLOCK;
            for (int q = item * CHUNK_ROWS / 4; q < end; q++) {
                const int n = 4 * q;
                const float *w = W + (size_t)n * K + k0;
                for (int b = 0; b < B; b += 4) {
                    const int S = B - b < 4 ? B - b : 4;
                    const float *xb = x + (size_t)b * K + k0;
                    float o[16];
                    if (S == 4) f32_tile4(xb, len, K, w, 4, o);
                    else if (S == 3) f32_tile4(xb, len, K, w, 3, o);
                    else if (S == 2) f32_tile4(xb, len, K, w, 2, o);
                    else f32_tile4(xb, len, K, w, 1, o);
                    for (int s = 0; s < S; s++)
                        for (int r = 0; r < 4; r++) {
                            if (k0 == 0) put(L, y, N, b + s, n + r, o[4 * s + r], accumulate);
                            else y[(size_t)(b + s) * N + n + r] += o[4 * s + r]; /* the next columns' share */
                        }
                }
            }
        }
        if (item == items - 1) /* N % 4 rows are left, one at a time (usually none) */
            for (int n = 4 * quads; n < N; n++)
                for (int b = 0; b < B; b++) put(L, y, N, b, n, f32_row(x + (size_t)b * K, K, W + (size_t)n * K), accumulate);
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define DECODE_ISA "avx512-vnni"
#define LOWBIT_TILE 1
#define ROW_KERNEL_BELOW 0
/* [x, y] as a 16-float vector: lanes 0-7 x, lanes 8-15 y (per-block values for two blocks). */
static inline __m512 halves(float x, float y) { return _mm512_shuffle_f32x4(_mm512_set1_ps(x), _mm512_set1_ps(y), 0x00); }

/* Four int8 weight rows (w, stride K) against S <= 4 rows of int8 activations (xq, stride K;
 * their block scales xs, stride K / 32): out[4 s + r] = sum over blocks b of xs_s[b] *
 * (w_r . xq_s over block b), the weight rows' own scales left to the caller. Two blocks (64
 * bytes) per step: vpdpbusd multiplies unsigned by signed bytes, so the weights enter as |w|
 * and the activations take w's sign (AVX-512 has no vpsignb: a masked subtraction from 0).
 * As f32_tile4, each loaded weight vector serves S sequences and each activation vector four
 * rows; one row against one sequence at a time (q8_row), a batch of 16 ran the int8 model's
 * step slower than the fp32 one. */
static inline __attribute__((always_inline)) void q8_tile4(const int8_t *xq, const float *xs, int K, const int8_t *w,
                                                           int S, float *out) {
    const int blocks = K / QK;
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b += 2) {
        const int pair = b + 1 < blocks; /* an odd last block fills the lower half alone */
        const __mmask64 m = pair ? ~0ull : 0xFFFFFFFFull;
        __m512i aw[4];
        __mmask64 neg[4];
        for (int r = 0; r < 4; r++) {
            _mm_prefetch((const char *)(w + (size_t)(r + 4) * K + b * QK), _MM_HINT_T0);
            const __m512i v = _mm512_maskz_loadu_epi8(m, w + (size_t)r * K + b * QK);
            aw[r] = _mm512_abs_epi8(v), neg[r] = _mm512_movepi8_mask(v);
        }
        for (int s = 0; s < S; s++) {
            const __m512i a = _mm512_maskz_loadu_epi8(m, xq + (size_t)s * K + b * QK);
            const float *sc = xs + (size_t)s * blocks + b;
            /* lanes 0-7 hold block b's sums, lanes 8-15 block b+1's */
            const __m512 scale = halves(sc[0], pair ? sc[1] : 0.0f);
            for (int r = 0; r < 4; r++) {
                const __m512i d = _mm512_dpbusd_epi32(zero, aw[r], _mm512_mask_sub_epi8(a, neg[r], zero, a));
                acc[r][s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[r][s]);
            }
        }
    }
    for (int s = 0; s < S; s++) _mm_storeu_ps(out + 4 * s, hsum4x16(acc[0][s], acc[1][s], acc[2][s], acc[3][s]));
}

/* The int4 counterpart: four rows of codes (q, K/2 bytes a row; scale and zero per group of
 * G) against S <= 4 sequences, fully scaled. The codes are unsigned, which is what vpdpbusd
 * takes; each block's product is scaled by the activations' block scale times the weights'
 * group scale, and the zero points come off at the end through the activations' group sums
 * (gsum, stride K/G), as in q4_row. 32 bytes of codes unpack to two blocks in order. */
static inline __attribute__((always_inline)) void q4_tile4(const int8_t *xq, const float *xs, const float *gsum, int K,
                                                           const uint8_t *q, const float *scale, const uint8_t *zero,
                                                           int G, int S, float *out) {
    const int blocks = K / QK, groups = K / G, per_group = G / QK;
    const __m512i zero_i = _mm512_setzero_si512(), low = _mm512_set1_epi8(0x0F);
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b += 2) {
        const int pair = b + 1 < blocks, g0 = b / per_group, g1 = pair ? (b + 1) / per_group : g0;
        const __mmask64 m = pair ? ~0ull : 0xFFFFFFFFull;
        __m512i u[4];
        __m512 wscale[4];
        for (int r = 0; r < 4; r++) {
            const uint8_t *p = q + (size_t)r * K / 2 + b * QK / 2;
            _mm_prefetch((const char *)(p + (size_t)2 * K), _MM_HINT_T0); /* the next tile's row r */
            const __m256i v = pair ? _mm256_loadu_si256((const __m256i *)p) : _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p));
            /* [low nibbles | high nibbles] of bytes 0-31, reordered to block b (bytes 0-15's low
             * then high nibbles) and block b+1 (bytes 16-31's) */
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
            u[r] = _mm512_shuffle_i64x2(_mm512_and_si512(both, low), _mm512_and_si512(both, low), 0xD8);
            const float *sr = scale + (size_t)r * groups;
            wscale[r] = halves(sr[g0], pair ? sr[g1] : 0.0f);
        }
        for (int s = 0; s < S; s++) {
            const __m512i a = _mm512_maskz_loadu_epi8(m, xq + (size_t)s * K + b * QK);
            const float *sc = xs + (size_t)s * blocks + b;
            const __m512 xscale = halves(sc[0], pair ? sc[1] : 0.0f);
            for (int r = 0; r < 4; r++)
                acc[r][s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero_i, u[r], a)),
                                            _mm512_mul_ps(xscale, wscale[r]), acc[r][s]);
        }
    }
    for (int s = 0; s < S; s++) {
        _mm_storeu_ps(out + 4 * s, hsum4x16(acc[0][s], acc[1][s], acc[2][s], acc[3][s]));
        for (int r = 0; r < 4; r++)
            for (int g = 0; g < groups; g++)
                out[4 * s + r] -= scale[(size_t)r * groups + g] * (float)zero[(size_t)r * groups + g] * gsum[(size_t)s * groups + g];
    }
}

/* Rows n..n+3 against sequences b..b+S-1 (S <= 4): out[4 s + r], fully scaled. */
static inline void lowbit_tile4(const Linear *L, const Work *ws, int n, int b, int S, float *out) {
    const int K = L->K, blocks = K / QK;
    const int8_t *xq = ws->xq + (size_t)b * K;
    const float *xs = ws->xs + (size_t)b * blocks;
    if (L->kind == Q8) {
        const int8_t *w = (const int8_t *)L->w + (size_t)n * K;
        if (S == 4) q8_tile4(xq, xs, K, w, 4, out);
        else if (S == 3) q8_tile4(xq, xs, K, w, 3, out);
        else if (S == 2) q8_tile4(xq, xs, K, w, 2, out);
        else q8_tile4(xq, xs, K, w, 1, out);
        for (int i = 0; i < 4 * S; i++) out[i] *= L->scale[n + i % 4];
        return;
    }
    const int groups = K / L->G;
    const uint8_t *q = (const uint8_t *)L->w + (size_t)n * K / 2, *zero = L->zero + (size_t)n * groups;
    const float *gsum = ws->gsum + (size_t)b * groups, *scale = L->scale + (size_t)n * groups;
    if (S == 4) q4_tile4(xq, xs, gsum, K, q, scale, zero, L->G, 4, out);
    else if (S == 3) q4_tile4(xq, xs, gsum, K, q, scale, zero, L->G, 3, out);
    else if (S == 2) q4_tile4(xq, xs, gsum, K, q, scale, zero, L->G, 2, out);
    else q4_tile4(xq, xs, gsum, K, q, scale, zero, L->G, 1, out);
}

/* The int8/int4 matmul on the activations quantized by `matvec`, in tiles of four rows. */
static void matvec_lowbit_batch(const Linear *L, const Work *ws, float *y, int B, int accumulate, Worker *wk) {
    const int N = L->N, quads = N / 4, items = (N + CHUNK_ROWS - 1) / CHUNK_ROWS;
    FOR_ITEMS(wk, item, items) {
        const int end = (item + 1) * CHUNK_ROWS / 4 < quads ? (item + 1) * CHUNK_ROWS / 4 : quads;
        for (int q = item * CHUNK_ROWS / 4; q < end; q++)
            for (int b = 0; b < B; b += 4) {
                const int S = B - b < 4 ? B - b : 4;
                float o[16];
                lowbit_tile4(L, ws, 4 * q, b, S, o);
                for (int s = 0; s < S; s++)
                    for (int r = 0; r < 4; r++) put(L, y, N, b + s, 4 * q + r, o[4 * s + r], accumulate);
            }
        if (item == items - 1) /* N % 4 rows are left, one at a time (usually none) */
            for (int n = 4 * quads; n < N; n++)
                for (int b = 0; b < B; b++) put(L, y, N, b, n, lowbit_row(L, ws, n, b, QK), accumulate);
    }
}
#else
#define DECODE_ISA "avx512"
#endif
#endif
