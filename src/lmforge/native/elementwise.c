/* Row-wise and element-wise kernels of a training step that PyTorch runs slowly on the CPU.
 *
 * The softmax cross-entropy and its gradient, in one pass per row. PyTorch's cross-entropy
 * takes a log-softmax over every row (a full copy of the logits), then in backward a scatter
 * into a zeroed tensor (another) and the log-softmax's backward (a third): three passes over
 * memory the size of the logits, a visible share of a small model's training step. Here
 * each row, while it sits in cache, gets its maximum, its exponentials and their sum, and
 * is overwritten by its gradient, so the logits' own memory holds the gradient that
 * lm_head's backward then multiplies.
 *
 * GELU (tanh form) and its derivative: PyTorch's take several times what streaming the
 * floats costs; here they are x times sigmoid(2z) with the vectorized exponential of
 * kernels.h, close to that cost. */
#include <omp.h>
#include <string.h>

#include "kernels.h"

int decode_supported(void); /* decode.c: whether this build has the AVX2 kernels, as this file needs */

int elementwise_supported(void) { return decode_supported(); }

#ifdef __AVX2__
/* Eight floats from fp32 or bf16 memory (element i on), and back; bf16 is rounded to nearest
 * even. Under bf16 autocast the logits and the MLP's activations are bf16, and reading them
 * as they are saves the fp32 copy PyTorch would make. */
static inline __m256 load8(const void *p, size_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline void store8(void *p, size_t i, __m256 v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)p + i, v);
        return;
    }
    __m256i b = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

static inline float load1(const void *p, size_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline void store1(void *p, size_t i, float v, int bf16) {
    if (!bf16) {
        ((float *)p)[i] = v;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    ((uint16_t *)p)[i] = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* For each row r of `logits` (rows, V), fp32 or bf16: loss[r] = logsumexp(row) - row[target[r]],
 * in fp32; with `grad`, the row becomes d loss[r] / d row = softmax(row) - onehot(target[r]),
 * in the logits' own type. A row whose target is `ignore` gets loss 0 and (with `grad`) a zero
 * gradient. Targets are in 0..V-1 otherwise (the caller checks). */
void cross_entropy_rows(void *logits, int bf16, int rows, int V, const int64_t *target, int64_t ignore, int grad,
                        float *loss, int threads) {
    const size_t width = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        void *x = (char *)logits + (size_t)r * V * width;
        const int64_t t = target[r];
        if (t == ignore) {
            loss[r] = 0.0f;
            if (grad) memset(x, 0, width * V);
            continue;
        }
        __m256 m8 = _mm256_set1_ps(-INFINITY);
        int i = 0;
        for (; i + 8 <= V; i += 8) m8 = _mm256_max_ps(m8, load8(x, i, bf16));
        float top = hmax(m8);
        for (; i < V; i++) top = fmaxf(top, load1(x, i, bf16));
        const float picked = load1(x, t, bf16);
        const __m256 shift = _mm256_set1_ps(top);
        __m256 s8 = _mm256_setzero_ps();
        /* fp32 rows keep their exponentials for the last pass; bf16 ones would lose them to
         * rounding, so that pass takes them again. */
        for (i = 0; i + 8 <= V; i += 8) {
            const __m256 e = exp8(_mm256_sub_ps(load8(x, i, bf16), shift));
            if (grad && !bf16) store8(x, i, e, 0);
            s8 = _mm256_add_ps(s8, e);
        }
        float sum = hsum(s8);
        for (; i < V; i++) {
            const float e = expf(load1(x, i, bf16) - top);
            if (grad && !bf16) store1(x, i, e, 0);
            sum += e;
        }
        loss[r] = logf(sum) + top - picked;
        if (!grad) continue;
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (i = 0; i + 8 <= V; i += 8) {
            const __m256 e = bf16 ? exp8(_mm256_sub_ps(load8(x, i, 1), shift)) : load8(x, i, 0);
            store8(x, i, _mm256_mul_ps(e, inv), bf16);
        }
        for (; i < V; i++) store1(x, i, (bf16 ? expf(load1(x, i, 1) - top) : load1(x, i, 0)) / sum, bf16);
        store1(x, t, expf(picked - top) / sum - 1.0f, bf16);
    }
}

#define GELU_BLOCK 4096 /* elements per task: whole vectors, few tasks */

/* y = gelu_tanh(x) for n elements, fp32 or bf16 (y of x's type). */
void gelu_forward(const void *x, void *y, int64_t n, int bf16, int threads) {
    const int64_t blocks = (n + GELU_BLOCK - 1) / GELU_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t lo = b * GELU_BLOCK, hi = lo + GELU_BLOCK < n ? lo + GELU_BLOCK : n;
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) {
            const __m256 v = load8(x, i, bf16);
            store8(y, i, _mm256_mul_ps(v, gelu_sigmoid(v)), bf16);
        }
        for (; i < hi; i++) {
            const float v = load1(x, i, bf16);
            store1(y, i, v * gelu_sigmoid1(v), bf16);
        }
    }
}

/* dx = dy * gelu_tanh'(x) for n elements, all three fp32 or all bf16:
 * d(x s)/dx = s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2). */
void gelu_backward(const void *x, const void *dy, void *dx, int64_t n, int bf16, int threads) {
    const int64_t blocks = (n + GELU_BLOCK - 1) / GELU_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t lo = b * GELU_BLOCK, hi = lo + GELU_BLOCK < n ? lo + GELU_BLOCK : n;
        const __m256 one = _mm256_set1_ps(1.0f), c2 = _mm256_set1_ps(2.0f * GELU_C), a3 = _mm256_set1_ps(3.0f * GELU_A);
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) {
            const __m256 v = load8(x, i, bf16), s = gelu_sigmoid(v);
            const __m256 dz = _mm256_mul_ps(c2, _mm256_fmadd_ps(a3, _mm256_mul_ps(v, v), one)); /* 2 dz/dx */
            const __m256 ds = _mm256_mul_ps(_mm256_mul_ps(v, s), _mm256_mul_ps(_mm256_sub_ps(one, s), dz));
            store8(dx, i, _mm256_mul_ps(load8(dy, i, bf16), _mm256_add_ps(s, ds)), bf16);
        }
        for (; i < hi; i++) {
            const float v = load1(x, i, bf16), s = gelu_sigmoid1(v);
            store1(dx, i, load1(dy, i, bf16) * (s + v * s * (1.0f - s) * 2.0f * GELU_C * (1.0f + 3.0f * GELU_A * v * v)),
                   bf16);
        }
    }
}
#else
void gelu_forward(const void *x, void *y, int64_t n, int bf16, int threads) {
    (void)x, (void)y, (void)n, (void)bf16, (void)threads;
}
void gelu_backward(const void *x, const void *dy, void *dx, int64_t n, int bf16, int threads) {
    (void)x, (void)dy, (void)dx, (void)n, (void)bf16, (void)threads;
}
void cross_entropy_rows(void *logits, int bf16, int rows, int V, const int64_t *target, int64_t ignore, int grad,
                        float *loss, int threads) {
    (void)logits, (void)bf16, (void)rows, (void)V, (void)target, (void)ignore, (void)grad, (void)loss, (void)threads;
}
#endif
