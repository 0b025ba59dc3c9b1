/* 2:4 sparse fp32 weights (decode.h's S24 Linear), read in their compact form: of every group
 * of 4 inputs a row keeps 2 weights, stored in input order as `v` (K/2 floats a row), their
 * positions in the group as 2-bit fields (lmforge/compress/sparse.py's layout): group g's
 * first position at bits 4g and its second at 4g + 2 of the row's index bytes read as
 * little-endian words, so in a 32-bit word field j (bits 2j) is the position of value j of
 * the 16 values (8 groups, 32 inputs) it covers.
 *
 * At batch 1 a matmul streams its weights from memory: 2:4 reads half the values plus an
 * eighth of a byte per input. The positions select the inputs with a permute from the
 * registers that hold the group's 32 (AVX-512: two registers, one permutex2var) or 16 (AVX2:
 * two 8-float permutes and a blend) inputs, not a gather from memory.
 */
#ifndef LMFORGE_SPARSE_H
#define LMFORGE_SPARSE_H

#include <stdint.h>
#include <string.h>

#include "kernels.h"

#ifdef __AVX2__
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

#ifdef __AVX512F__
/* The 16 inputs (as indices into the 32 at x) that a 32-bit index word selects. */
static inline __m512i s24_select16(uint32_t word) {
    const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i base = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
    /* (field & 3) | base in one ternary-logic op (base is a multiple of 4: | is +) */
    return _mm512_ternarylogic_epi32(_mm512_srlv_epi32(_mm512_set1_epi32((int)word), shifts), _mm512_set1_epi32(3),
                                     base, 0xEA);
}

/* W[n] . x for one 2:4 row (K % 4 == 0). */
static inline float s24_row(const float *x, int K, const float *v, const uint8_t *idx) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        uint32_t w0, w1;
        memcpy(&w0, idx + k / 8, 4);
        memcpy(&w1, idx + k / 8 + 4, 4);
        __m512 x0 = _mm512_permutex2var_ps(_mm512_loadu_ps(x + k), s24_select16(w0), _mm512_loadu_ps(x + k + 16));
        __m512 x1 = _mm512_permutex2var_ps(_mm512_loadu_ps(x + k + 32), s24_select16(w1), _mm512_loadu_ps(x + k + 48));
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + k / 2), x0, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + k / 2 + 16), x1, a1);
    }
    for (; k + 32 <= K; k += 32) {
        uint32_t w0;
        memcpy(&w0, idx + k / 8, 4);
        __m512 x0 = _mm512_permutex2var_ps(_mm512_loadu_ps(x + k), s24_select16(w0), _mm512_loadu_ps(x + k + 16));
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + k / 2), x0, a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + s24_tail(x, k, K, v, idx);
}
#else
/* The 8 inputs that a 16-bit index word selects from the 16 at x. */
static inline __m256 s24_gather8(const float *x, uint16_t word) {
    const __m256i shifts = _mm256_set_epi32(14, 12, 10, 8, 6, 4, 2, 0);
    const __m256i base = _mm256_set_epi32(4, 4, 0, 0, 4, 4, 0, 0); /* a permute reads 3 bits: mod 8 */
    const __m256i sel = _mm256_add_epi32(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32(3)), base);
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), sel);     /* groups 0, 1: inputs 0-7 */
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8), sel); /* groups 2, 3: inputs 8-15 */
    return _mm256_blend_ps(lo, hi, 0xF0);
}

static inline float s24_row(const float *x, int K, const float *v, const uint8_t *idx) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        uint16_t w0, w1;
        memcpy(&w0, idx + k / 8, 2);
        memcpy(&w1, idx + k / 8 + 2, 2);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k / 2), s24_gather8(x + k, w0), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + k / 2 + 8), s24_gather8(x + k + 16, w1), a1);
    }
    return hsum(_mm256_add_ps(a0, a1)) + s24_tail(x, k, K, v, idx);
}
#endif
#endif /* __AVX2__ */

#endif
