/* Part of decode.c, included by it once where the CPU has AVX2 but not AVX-512
 * (decode_avx512.h otherwise): the batched matmuls in 256-bit tiles. Builds on decode.c's
 * Linear, Work, Worker, FOR_ITEMS, put, CHUNK_ROWS, lowbit_row and row_layout, and defines
 * - matvec_f32_batch, the fp32 matmul for a batch (B >= 4);
 * - matvec_lowbit_batch (the int8/int4 matmul in tiles of two rows) and LOWBIT_TILE, which
 *   has decode.c's matvec take it, and ROW_KERNEL_BELOW, the batch below which it takes the
 *   row kernels instead;
 * - DECODE_ISA, the name decode_isa() reports.
 */
#ifndef LMFORGE_DECODE_AVX2_H
#define LMFORGE_DECODE_AVX2_H

#define DECODE_ISA "avx2"

/* Two fp32 weight rows against four activation rows (stride K): o0[b] = w0 . x_b and
 * o1[b] = w1 . x_b. Each loaded weight vector serves four FMAs and each activation vector
 * two, so the FMA units rather than the loads set the pace; eight independent
 * accumulators cover the FMA latency. This is what makes a batch of sequences cheaper
 * per token than one: one row at a time (f32_row) needs two loads per FMA, and the loads
 * then set the pace. */
static inline void f32_tile2x4(const float *x, int K, const float *w0, const float *w1, float *o0, float *o1) {
    const float *x0 = x, *x1 = x + K, *x2 = x + 2 * (size_t)K, *x3 = x + 3 * (size_t)K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        /* The next pair of rows (2K floats on) is fetched while this one computes, so the
         * tile does not wait on memory between pairs. */
        _mm_prefetch((const char *)(w0 + 2 * (size_t)K + k), _MM_HINT_T0);
        _mm_prefetch((const char *)(w1 + 2 * (size_t)K + k), _MM_HINT_T0);
        const __m256 v = _mm256_loadu_ps(w0 + k), u = _mm256_loadu_ps(w1 + k);
        __m256 t = _mm256_loadu_ps(x0 + k);
        a0 = _mm256_fmadd_ps(v, t, a0), c0 = _mm256_fmadd_ps(u, t, c0);
        t = _mm256_loadu_ps(x1 + k);
        a1 = _mm256_fmadd_ps(v, t, a1), c1 = _mm256_fmadd_ps(u, t, c1);
        t = _mm256_loadu_ps(x2 + k);
        a2 = _mm256_fmadd_ps(v, t, a2), c2 = _mm256_fmadd_ps(u, t, c2);
        t = _mm256_loadu_ps(x3 + k);
        a3 = _mm256_fmadd_ps(v, t, a3), c3 = _mm256_fmadd_ps(u, t, c3);
    }
    o0[0] = hsum(a0), o0[1] = hsum(a1), o0[2] = hsum(a2), o0[3] = hsum(a3);
    o1[0] = hsum(c0), o1[1] = hsum(c1), o1[2] = hsum(c2), o1[3] = hsum(c3);
    for (; k < K; k++) {
        o0[0] += w0[k] * x0[k], o0[1] += w0[k] * x1[k], o0[2] += w0[k] * x2[k], o0[3] += w0[k] * x3[k];
        o1[0] += w1[k] * x0[k], o1[1] += w1[k] * x1[k], o1[2] += w1[k] * x2[k], o1[3] += w1[k] * x3[k];
    }
}

/* The fp32 matmul for a batch (B >= 4): output rows in pairs, activation rows in fours. */
static void matvec_f32_batch(const Linear *L, const float *x, float *y, int B, int accumulate, Worker *wk) {
    const int N = L->N, K = L->K, pairs = (N + 1) / 2;
    const float *W = (const float *)L->w;
    FOR_ITEMS(wk, item, (N + CHUNK_ROWS - 1) / CHUNK_ROWS) {
        const int end = (item + 1) * CHUNK_ROWS / 2 < pairs ? (item + 1) * CHUNK_ROWS / 2 : pairs;
        for (int p = item * CHUNK_ROWS / 2; p < end; p++) {
            const int n = 2 * p, pair = n + 1 < N;
            const float *w0 = W + (size_t)n * K, *w1 = pair ? w0 + K : w0; /* an odd last row pairs with itself */
            int b = 0;
            for (; b + 4 <= B; b += 4) {
                float o0[4], o1[4];
                f32_tile2x4(x + (size_t)b * K, K, w0, w1, o0, o1);
                for (int i = 0; i < 4; i++) {
                    put(L, y, N, b + i, n, o0[i], accumulate);
                    if (pair) put(L, y, N, b + i, n + 1, o1[i], accumulate);
                }
            }
            for (; b < B; b++) {
                put(L, y, N, b, n, f32_row(x + (size_t)b * K, K, w0), accumulate);
                if (pair) put(L, y, N, b, n + 1, f32_row(x + (size_t)b * K, K, w1), accumulate);
            }
        }
    }
}
/* The int8/int4 tiles: without VNNI, a 32-byte product is vpmaddubsw (unsigned x signed
 * bytes into pairs of int16) then vpmaddwd by ones (into eight int32), as in kernels.h's row
 * kernels and llama.cpp's AVX2 path. Two weight rows meet up to four sequences (eight
 * accumulators for int8, four for int4), and the weights' absolute values (int8) or unpacked codes (int4) are made
 * once per block for all the sequences instead of once per sequence; one row per (row,
 * sequence) re-derived them for each. AVX2's sixteen registers hold two rows, not four. */
#define LOWBIT_TILE 1

/* out[2 s + r] = the sum of acc[r][s]'s eight lanes, four at a time where S allows. */
static inline __attribute__((always_inline)) void tile2_sums(__m256 acc[2][4], int S, float *out) {
    int s = 0;
    for (; s + 2 <= S; s += 2) _mm_storeu_ps(out + 2 * s, hsum4x8(acc[0][s], acc[1][s], acc[0][s + 1], acc[1][s + 1]));
    if (s < S) out[2 * s] = hsum(acc[0][s]), out[2 * s + 1] = hsum(acc[1][s]);
}

/* Two int8 weight rows (w, stride K) against S <= 4 rows of int8 activations (xq, stride K;
 * block scales xs, stride K / 32): out[2 s + r] = sum over blocks b of xs_s[b] * (w_r . xq_s
 * over block b), the rows' own scales left to the caller. vpmaddubsw multiplies unsigned by
 * signed bytes: the weights enter as |w| and the activations take w's sign (|w| <= 127, so
 * the int16 pair sums cannot saturate). */
static inline __attribute__((always_inline)) void q8_tile2(const int8_t *xq, const float *xs, int K, const int8_t *w,
                                                           int S, float *out) {
    const int blocks = K / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][4];
    for (int r = 0; r < 2; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        _mm_prefetch((const char *)(w + 2 * (size_t)K + b * QK), _MM_HINT_T0); /* the next tile's rows */
        _mm_prefetch((const char *)(w + 3 * (size_t)K + b * QK), _MM_HINT_T0);
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + b * QK));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + K + b * QK));
        const __m256i u0 = _mm256_sign_epi8(w0, w0), u1 = _mm256_sign_epi8(w1, w1);
        for (int s = 0; s < S; s++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(xq + (size_t)s * K + b * QK));
            const __m256 d = _mm256_set1_ps(xs[(size_t)s * blocks + b]);
            const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(a, w0)), ones);
            const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(a, w1)), ones);
            acc[0][s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), d, acc[0][s]);
            acc[1][s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), d, acc[1][s]);
        }
    }
    tile2_sums(acc, S, out);
}

/* The int4 counterpart: two rows of codes (q, K/2 bytes a row; scale and zero per group of
 * G) against S <= 4 sequences, fully scaled. The codes are unsigned, which is what
 * vpmaddubsw takes; each block's product is scaled by the activations' block scale times the
 * weights' group scale, and the zero points come off at the end through the activations'
 * group sums (gsum, stride K/G), as in q4_row. */
static inline __attribute__((always_inline)) void q4_tile2(const int8_t *xq, const float *xs, const float *gsum, int K,
                                                           const uint8_t *q, const float *scale, const uint8_t *zero,
                                                           int G, int S, float *out) {
    const int blocks = K / QK, groups = K / G, per_group = G / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4]; /* per sequence, both rows: lanes [r0 r0 r1 r1 | r0 r0 r1 r1] */
    for (int s = 0; s < S; s++) acc[s] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        const uint8_t *p = q + b * QK / 2;
        _mm_prefetch((const char *)(p + (size_t)K), _MM_HINT_T0); /* the next tile's rows (K/2 bytes each) */
        const __m256i c0 = nibbles(p), c1 = nibbles(p + K / 2);
        const int g = b / per_group;
        const __m256 sc = _mm256_blend_ps(_mm256_set1_ps(scale[g]), _mm256_set1_ps(scale[groups + g]), 0xCC);
        for (int s = 0; s < S; s++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(xq + (size_t)s * K + b * QK));
            /* codes <= 15 and |a| <= 127: the int16 pair sums of both rows add without overflow,
             * so one vpmaddwd and one conversion serve the two rows */
            const __m256i h = _mm256_hadd_epi16(_mm256_maddubs_epi16(c0, a), _mm256_maddubs_epi16(c1, a));
            const __m256 d = _mm256_mul_ps(_mm256_set1_ps(xs[(size_t)s * blocks + b]), sc);
            acc[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(h, ones)), d, acc[s]);
        }
    }
    for (int s = 0; s < S; s += 2) { /* [s r0, s r1, s+1 r0, s+1 r1] */
        const __m128 u = _mm_add_ps(_mm256_castps256_ps128(acc[s]), _mm256_extractf128_ps(acc[s], 1));
        const __m128 v = s + 1 < S ? _mm_add_ps(_mm256_castps256_ps128(acc[s + 1]), _mm256_extractf128_ps(acc[s + 1], 1)) : u;
        const __m128 pair = _mm_hadd_ps(u, v);
        out[2 * s] = _mm_cvtss_f32(pair), out[2 * s + 1] = _mm_cvtss_f32(_mm_shuffle_ps(pair, pair, 1));
        if (s + 1 < S) out[2 * s + 2] = _mm_cvtss_f32(_mm_shuffle_ps(pair, pair, 2)), out[2 * s + 3] = _mm_cvtss_f32(_mm_shuffle_ps(pair, pair, 3));
    }
    for (int r = 0; r < 2; r++)
        for (int g = 0; g < groups; g++) {
            const float sz = scale[(size_t)r * groups + g] * (float)zero[(size_t)r * groups + g];
            for (int s = 0; s < S; s++) out[2 * s + r] -= sz * gsum[(size_t)s * groups + g];
        }
}

/* Rows n, n+1 against sequences b..b+S-1 (S <= 4): out[2 s + r], fully scaled. */
static inline void lowbit_tile2(const Linear *L, const Work *ws, int n, int b, int S, float *out) {
    const int K = L->K, blocks = K / QK;
    const int8_t *xq = ws->xq + (size_t)b * K;
    const float *xs = ws->xs + (size_t)b * blocks;
    if (L->kind == Q8) {
        const int8_t *w = (const int8_t *)L->w + (size_t)n * K;
        if (S == 4) q8_tile2(xq, xs, K, w, 4, out);
        else if (S == 3) q8_tile2(xq, xs, K, w, 3, out);
        else if (S == 2) q8_tile2(xq, xs, K, w, 2, out);
        else q8_tile2(xq, xs, K, w, 1, out);
        for (int i = 0; i < 2 * S; i++) out[i] *= L->scale[n + i % 2];
        return;
    }
    const int groups = K / L->G;
    const uint8_t *q = (const uint8_t *)L->w + (size_t)n * K / 2, *zero = L->zero + (size_t)n * groups;
    const float *gsum = ws->gsum + (size_t)b * groups, *scale = L->scale + (size_t)n * groups;
    if (S == 4) q4_tile2(xq, xs, gsum, K, q, scale, zero, L->G, 4, out);
    else if (S == 3) q4_tile2(xq, xs, gsum, K, q, scale, zero, L->G, 3, out);
    else if (S == 2) q4_tile2(xq, xs, gsum, K, q, scale, zero, L->G, 2, out);
    else q4_tile2(xq, xs, gsum, K, q, scale, zero, L->G, 1, out);
}

/* The int8/int4 matmul on the activations quantized by `matvec`, in tiles of two rows from
 * four sequences up. Fewer take the row kernels, whatever the model's size: with one or two
 * accumulators per row a tile of 256-bit products ran slower than kernels.h's rows, whose
 * two blocks per step keep more products in flight (benchmarks/quant_decode_sizes.py). */
#define ROW_KERNEL_BELOW 4
static void matvec_lowbit_batch(const Linear *L, const Work *ws, float *y, int B, int accumulate, Worker *wk) {
    const int N = L->N, pairs = N / 2, items = (N + CHUNK_ROWS - 1) / CHUNK_ROWS;
    if (B < ROW_KERNEL_BELOW) {
        FOR_ITEMS(wk, item, items) {
            const int end = (item + 1) * CHUNK_ROWS < N ? (item + 1) * CHUNK_ROWS : N;
            for (int n = item * CHUNK_ROWS; n < end; n++)
                for (int b = 0; b < B; b++) put(L, y, N, b, n, lowbit_row(L, ws, n, b, row_layout(L)), accumulate);
        }
        return;
    }
    FOR_ITEMS(wk, item, items) {
        const int end = (item + 1) * CHUNK_ROWS / 2 < pairs ? (item + 1) * CHUNK_ROWS / 2 : pairs;
        for (int p = item * CHUNK_ROWS / 2; p < end; p++)
            for (int b = 0; b < B; b += 4) {
                const int S = B - b < 4 ? B - b : 4;
                float o[8];
                lowbit_tile2(L, ws, 2 * p, b, S, o);
                for (int s = 0; s < S; s++)
                    for (int r = 0; r < 2; r++) put(L, y, N, b + s, 2 * p + r, o[2 * s + r], accumulate);
            }
        if (item == items - 1 && N % 2) /* an odd last row alone */
            for (int b = 0; b < B; b++) put(L, y, N, b, N - 1, lowbit_row(L, ws, N - 1, b, QK), accumulate);
    }
}
#endif
