/* Part of decode.c, included by it once where the CPU has AVX2 but not AVX-512
 * (decode_avx512.h otherwise): the batched fp32 matmul in 256-bit tiles. Builds on
 * decode.c's Linear, Worker, FOR_ITEMS, put and CHUNK_ROWS, and defines
 * - matvec_f32_batch, the fp32 matmul for a batch (B >= 4);
 * - DECODE_ISA, the name decode_isa() reports.
 * The int8/int4 matmuls keep kernels.h's row kernels here (no LOWBIT_TILE).
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
#endif
