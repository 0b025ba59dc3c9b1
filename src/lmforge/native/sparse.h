/* 2:4 sparse fp32 weights (decode.h's S24 Linear), read in their compact form: of every group
 * of 4 inputs a row keeps 2 weights, stored as `v` (K/2 floats a row), their positions in the
 * group as 2-bit fields (lmforge/compress/sparse.py's layout): group g's first position at bits
 * 4g and its second at 4g + 2 of the row's index bytes read as little-endian words, so in a
 * 32-bit word field j (bits 2j) is the position of value j of the 16 values (8 groups, 32
 * inputs) it covers. In memory (not in the file) the values of each whole 32-input block are in
 * the kernels' order, each 8 as [0, 1, 4, 5, 2, 3, 6, 7] (sparse_format.KERNEL_ORDER), which
 * lets AVX2 pick them with in-lane permutes; the last K % 32 inputs' values stay in input order.
 *
 * At batch 1 a matmul streams its weights from memory: 2:4 reads half the values plus an
 * eighth of a byte per input. The positions select the inputs with two in-lane permutes and
 * a blend per 8 values from the registers that hold the inputs, not a gather from memory.
 * AVX-512 builds run the same 256-bit row kernel: one 512-bit permutex2var per 16 values
 * decoded the base shape slower (benchmarks/sparse_decode.py). The rows' values are prefetched S24_PREFETCH floats ahead: without it the 2:4 rows stream well below
 * the bandwidth the dense rows reach (benchmarks/sparse_decode.py).
 *
 * Part of decode.c, included after its batched matmuls (decode_avx512.h or decode_avx2.h): the
 * batched 2:4 matmul (matvec_s24) builds on their dense tiles and on decode.c's Linear, Worker,
 * FOR_ITEMS, put and CHUNK_ROWS.
 */
#ifndef LMFORGE_SPARSE_H
#define LMFORGE_SPARSE_H

#include <stdint.h>
#include <string.h>

#include "kernels.h"

#ifdef __AVX2__
#define S24_PREFETCH 2048 /* floats: 8 KB ahead in a row's values (or the next rows') */

/* The 32 values (two cache lines) S24_PREFETCH ahead of v; past the end of the matrix a
 * prefetch is harmless (it never faults). */
static inline void s24_prefetch(const float *v) {
    _mm_prefetch((const char *)(v + S24_PREFETCH), _MM_HINT_T0);
    _mm_prefetch((const char *)(v + S24_PREFETCH + 16), _MM_HINT_T0);
}

static inline int s24_index_bytes(int K) { return (K / 4 + 1) / 2; } /* a row's index bytes */

/* The positions of the last groups, one at a time. */
static inline float s24_tail(const float *x, int k, int K, const float *v, const uint8_t *idx) {
    float s = 0.0f;
    for (; k < K; k += 4) {
        const int nib = (idx[k / 8] >> (4 * ((k / 4) & 1))) & 15;
        s += v[k / 2] * x[k + (nib & 3)] + v[k / 2 + 1] * x[k + (nib >> 2)];
    }
    return s;
}

/* The 8 values' inputs of 16 (x, groups 0-3) whose fields are the ones `fields` has at bits
 * [1:0] of each lane (in KERNEL_ORDER: lanes 0, 1 and 4, 5 from groups 0 and 1 in x's low and
 * high halves, lanes 2, 3 and 6, 7 from groups 2 and 3 in x + 8's). vpermilps reads only those
 * two bits, in-lane, so neither a mask nor a lane offset is needed. */
static inline __m256 s24_select8(const float *x, __m256i fields) {
    return _mm256_blend_ps(_mm256_permutevar_ps(_mm256_loadu_ps(x), fields),
                           _mm256_permutevar_ps(_mm256_loadu_ps(x + 8), fields), 0xCC);
}

/* A 32-bit index word's fields for its first and second 8 values (KERNEL_ORDER), at bits [1:0]. */
#define S24_FIELDS_LO _mm256_set_epi32(14, 12, 6, 4, 10, 8, 2, 0)
#define S24_FIELDS_HI _mm256_set_epi32(30, 28, 22, 20, 26, 24, 18, 16)

static inline float s24_row(const float *x, int K, const float *v, const uint8_t *idx) {
    const __m256i lo = S24_FIELDS_LO, hi = S24_FIELDS_HI;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        s24_prefetch(v + k / 2);
        uint32_t w0, w1;
        memcpy(&w0, idx + k / 8, 4);
        memcpy(&w1, idx + k / 8 + 4, 4);
        const __m256i b0 = _mm256_set1_epi32((int)w0), b1 = _mm256_set1_epi32((int)w1);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k / 2), s24_select8(x + k, _mm256_srlv_epi32(b0, lo)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k / 2 + 8), s24_select8(x + k + 16, _mm256_srlv_epi32(b0, hi)), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k / 2 + 16), s24_select8(x + k + 32, _mm256_srlv_epi32(b1, lo)), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k / 2 + 24), s24_select8(x + k + 48, _mm256_srlv_epi32(b1, hi)), a3);
    }
    for (; k + 32 <= K; k += 32) {
        uint32_t w0;
        memcpy(&w0, idx + k / 8, 4);
        const __m256i b0 = _mm256_set1_epi32((int)w0);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k / 2), s24_select8(x + k, _mm256_srlv_epi32(b0, lo)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k / 2 + 8), s24_select8(x + k + 16, _mm256_srlv_epi32(b0, hi)), a1);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + s24_tail(x, k, K, v, idx);
}

/* Batches. At 4 sequences or fewer the row kernel above runs once per (row, sequence): each
 * sequence redoes a row's permutes, which still beats the dense tiles' FMAs on the zeros. From
 * S24_TILE_MIN_BATCH on, AVX-512 expands each 4 rows to dense fp32 in L1 (s24_expand) and runs
 * decode_avx512.h's dense tile (f32_tile4) on them against every sequence: the zeros cost FMAs,
 * which a batch keeps busy anyway, and the bytes read from memory stay the compact form's. With
 * AVX2 the expansion costs as much as it saves (its 8-float tiles do half the work per
 * instruction), so from S24_DENSE_MIN_BATCH on an AVX2 batch reads the layer's dense matrix
 * (Linear.scale: the model's own fp32 weight, which it holds anyway) with the dense tiles.
 * benchmarks/sparse_decode.py --batch measures both against the dense model. */
#define S24_TILE_MIN_BATCH 5
#define S24_DENSE_MIN_BATCH 6

#ifdef __AVX512F__
/* For each index byte (groups a, b): the control that places a chunk's two values of group a
 * in lanes 0-3 and of b in lanes 4-7 (which of the two, 0 or 1, read by vpermilps from
 * KERNEL_ORDER's [a0 a1 c0 c1 | b0 b1 d0 d1]), with the sign bit set where the input is pruned. */
static int32_t s24_expand_control[256][8];

__attribute__((constructor)) static void s24_expand_control_init(void) {
    for (int byte = 0; byte < 256; byte++)
        for (int lane = 0; lane < 8; lane++) {
            const int nibble = (byte >> (4 * (lane / 4))) & 15, p = lane % 4;
            s24_expand_control[byte][lane] = p == (nibble & 3) ? 0 : p == (nibble >> 2) ? 1 : INT32_MIN;
        }
}

/* The dense row (K floats) of one compact row (values in KERNEL_ORDER, index bytes idx). */
static inline void s24_expand(const float *v, const uint8_t *idx, int K, float *out) {
    const __m256 zero = _mm256_setzero_ps();
    const __m256i two = _mm256_set1_epi32(2); /* groups c, d: the values at 2 and 3 of each half */
    int k = 0;
    for (; k + 16 <= K - K % 32; k += 16) { /* 8 values (groups a-d, index bytes idx[k/8], idx[k/8+1]) */
        if (k % 64 == 0) s24_prefetch(v + k / 2); /* the next tiles' rows arrive while the tiles compute */
        const __m256 vals = _mm256_loadu_ps(v + k / 2);
        const __m256i ab = _mm256_loadu_si256((const __m256i *)s24_expand_control[idx[k / 8]]);
        const __m256i cd = _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)s24_expand_control[idx[k / 8 + 1]]), two);
        _mm256_storeu_ps(out + k, _mm256_blendv_ps(_mm256_permutevar_ps(vals, ab), zero, _mm256_castsi256_ps(ab)));
        _mm256_storeu_ps(out + k + 8, _mm256_blendv_ps(_mm256_permutevar_ps(vals, cd), zero, _mm256_castsi256_ps(cd)));
    }
    for (; k < K; k += 4) { /* the last K % 32 inputs, values in input order */
        const int nib = (idx[k / 8] >> (4 * ((k / 4) & 1))) & 15;
        out[k] = out[k + 1] = out[k + 2] = out[k + 3] = 0.0f;
        out[k + (nib & 3)] = v[k / 2];
        out[k + (nib >> 2)] = v[k / 2 + 1];
    }
}

#define S24_EXPAND_MAX_K 8192 /* the expanded tile lives on the stack: at most 128 KB */

/* y[b, n..n+3] from the 4 expanded rows w (stride K) for every sequence b. */
static inline void s24_tile_rows(const Linear *L, const float *x, const float *w, int n, int B, float *y,
                                 int accumulate) {
    const int N = L->N, K = L->K;
    for (int b = 0; b < B; b += 4) {
        const int S = B - b < 4 ? B - b : 4;
        float o[16];
        if (S == 4) f32_tile4(x + (size_t)b * K, K, K, w, 4, o);
        else if (S == 3) f32_tile4(x + (size_t)b * K, K, K, w, 3, o);
        else if (S == 2) f32_tile4(x + (size_t)b * K, K, K, w, 2, o);
        else f32_tile4(x + (size_t)b * K, K, K, w, 1, o);
        for (int s = 0; s < S; s++)
            for (int r = 0; r < 4; r++) put(L, y, N, b + s, n + r, o[4 * s + r], accumulate);
    }
}
#endif

/* The 2:4 matmul (decode.c's matvec for S24 layers): output rows shared in chunks, each weight
 * row read once for all B sequences. */
static void matvec_s24(const Linear *L, const float *x, float *y, int B, int accumulate, Worker *wk) {
    const int N = L->N, K = L->K, row_bytes = s24_index_bytes(K);
    const float *V = (const float *)L->w;
    const uint8_t *I = L->zero;
#ifdef __AVX512F__
    const int tiles = B >= S24_TILE_MIN_BATCH && K <= S24_EXPAND_MAX_K;
#else
    if (B >= S24_DENSE_MIN_BATCH && L->scale) {
        const Linear dense = {F32, N, K, 0, L->scale, NULL, NULL, L->bias};
        matvec_f32_batch(&dense, x, y, B, accumulate, wk);
        return;
    }
    const int tiles = 0;
#endif
    FOR_ITEMS(wk, item, (N + CHUNK_ROWS - 1) / CHUNK_ROWS) {
        const int end = (item + 1) * CHUNK_ROWS < N ? (item + 1) * CHUNK_ROWS : N;
        int n = item * CHUNK_ROWS;
#ifdef __AVX512F__
        if (tiles) {
            float raw[4 * K + 16]; /* aligned to a cache line: split loads would cost the tiles twice */
            float *w = (float *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
            for (; n + 4 <= end; n += 4) {
                for (int r = 0; r < 4; r++)
                    s24_expand(V + (size_t)(n + r) * (K / 2), I + (size_t)(n + r) * row_bytes, K, w + (size_t)r * K);
                s24_tile_rows(L, x, w, n, B, y, accumulate);
            }
        }
#endif
        for (; n < end; n++)
            for (int b = 0; b < B; b++)
                put(L, y, N, b, n, s24_row(x + (size_t)b * K, K, V + (size_t)n * (K / 2), I + (size_t)n * row_bytes),
                    accumulate);
    }
}
#endif /* __AVX2__ */

#endif
