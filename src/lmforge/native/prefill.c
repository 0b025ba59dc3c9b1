/* The elementwise work around a prefill's matmuls, one pass each (lmforge.model.fused).
 *
 * PyTorch runs an RMSNorm as five passes over the activations (square, mean, rsqrt, two
 * multiplies), rotary embeddings as six (two products, a negation, a concatenation, a sum,
 * for queries and keys apart) and SwiGLU's silu(gate) * up as two; each reads and writes the
 * whole (tokens, width) tensor. Here each row is read once while it sits in the L1 cache:
 *
 * - rmsnorm_rows: y = w * (s / rms(s)), with s = x, or s = x + res written out too (the
 *   residual add folded into the norm that follows it);
 * - rope_rows: queries and keys rotated in place inside the fused qkv projection's output;
 * - silu_mul_rows: silu(gate) * up from the fused gate/up projection's output;
 * - causal_softmax_rows: the softmax of a block of attention scores, each query's row up to
 *   its own position, between the two matmuls of blocked causal attention.
 *
 * fp32 only. The same code is 16 floats wide where the build targets AVX-512 and 8 wide
 * where it targets AVX2 (LMFORGE_NATIVE_ARCH=haswell builds that one anywhere); without
 * AVX2 prefill_supported() says 0 and the caller keeps PyTorch's ops. */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "kernels.h"

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vec;
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vset1(float x) { return _mm512_set1_ps(x); }
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vfmsub(vec a, vec b, vec c) { return _mm512_fmsub_ps(a, b, c); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline float vmaxall(vec v) { return _mm512_reduce_max_ps(v); }
/* e^x: x = n ln2 + r, e^r by a degree-6 polynomial, times 2^n by scalef (inputs clamped to
 * +-88, where fp32 ends). */
static inline vec vexp(vec x) {
    x = _mm512_min_ps(_mm512_max_ps(x, vset1(-87.0f)), vset1(88.0f));
    const vec n = _mm512_roundscale_ps(vmul(x, vset1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vec r = _mm512_fnmadd_ps(n, vset1(0.693359375f), x); /* ln2 in two parts */
    r = _mm512_fnmadd_ps(n, vset1(-2.12194440e-4f), r);
    vec p = vset1(1.0f / 720);
    p = vfmadd(p, r, vset1(1.0f / 120));
    p = vfmadd(p, r, vset1(1.0f / 24));
    p = vfmadd(p, r, vset1(1.0f / 6));
    p = vfmadd(p, r, vset1(0.5f));
    p = vfmadd(p, r, vset1(1.0f));
    p = vfmadd(p, r, vset1(1.0f));
    return _mm512_scalef_ps(p, n);
}
#elif defined(__AVX2__)
#define VW 8
typedef __m256 vec;
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vset1(float x) { return _mm256_set1_ps(x); }
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vfmsub(vec a, vec b, vec c) { return _mm256_fmsub_ps(a, b, c); }
static inline float vsum(vec v) { return hsum(v); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline float vmaxall(vec v) { return hmax(v); }
static inline vec vexp(vec x) { return exp8(x); }
#endif

/* 512 (AVX-512), 256 (AVX2) or 0: the vector width in bits this build runs, 0 for none. */
int prefill_supported(void) {
#if defined(VW)
    return VW * 32;
#else
    return 0;
#endif
}

#if defined(VW)
/* rows x dim, row-major. res may be NULL (then sum is not written). */
void rmsnorm_rows(const float *x, const float *res, float *sum, float *y, const float *w, int64_t rows, int dim,
                  float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        const float *s = xr;
        float *yr = y + r * dim;
        if (res != NULL) {
            const float *rr = res + r * dim;
            float *sr = sum + r * dim;
            int i = 0;
            for (; i + VW <= dim; i += VW) vstore(sr + i, vadd(vload(xr + i), vload(rr + i)));
            for (; i < dim; i++) sr[i] = xr[i] + rr[i];
            s = sr;
        }
        vec acc = vzero();
        int i = 0;
        for (; i + VW <= dim; i += VW) {
            const vec v = vload(s + i);
            acc = vfmadd(v, v, acc);
        }
        float ss = vsum(acc);
        for (; i < dim; i++) ss += s[i] * s[i];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        const vec inv8 = vset1(inv);
        for (i = 0; i + VW <= dim; i += VW) vstore(yr + i, vmul(vload(w + i), vmul(vload(s + i), inv8)));
        for (; i < dim; i++) yr[i] = w[i] * (s[i] * inv);
    }
}

/* The first `heads` heads (of d floats each) of every token row of x, rotated in place by
 * RoPE: (a, b) -> (a cos - b sin, b cos + a sin) for the halves a, b of each head. Token
 * (b, t) starts at x + b * x_batch + t * x_token; its angles at cos/sin + b * table_batch +
 * t * d (a table row holds each angle twice, as the model's tables do; the first half is read). */
void rope_rows(float *x, int64_t batch, int64_t tokens, int64_t x_batch, int64_t x_token, int heads, int d,
               const float *cos, const float *sin, int64_t table_batch, int threads) {
    const int half = d / 2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t t = 0; t < tokens; t++) {
            float *row = x + b * x_batch + t * x_token;
            const float *c = cos + b * table_batch + t * d, *s = sin + b * table_batch + t * d;
            for (int h = 0; h < heads; h++) {
                float *lo = row + (int64_t)h * d, *hi = lo + half;
                int i = 0;
                for (; i + VW <= half; i += VW) {
                    const vec a = vload(lo + i), bb = vload(hi + i), cv = vload(c + i), sv = vload(s + i);
                    vstore(lo + i, vfmsub(a, cv, vmul(bb, sv)));
                    vstore(hi + i, vfmadd(bb, cv, vmul(a, sv)));
                }
                for (; i < half; i++) {
                    const float a = lo[i], bb = hi[i];
                    lo[i] = a * c[i] - bb * s[i];
                    hi[i] = bb * c[i] + a * s[i];
                }
            }
        }
    }
}

/* Causal softmax over query blocks of attention scores (rows, cols), row stride `ld`: the
 * rows are `heads` runs of n queries; query i of a run sees its first first_limit + i + 1
 * columns, whose scaled scores become their softmax in place; the columns after are zeroed
 * (the matmul with the values that follows reads whole rows). */
void causal_softmax_rows(float *scores, int64_t rows, int64_t n, int64_t ld, int64_t cols, int64_t first_limit,
                         float scale, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        float *x = scores + r * ld;
        int64_t limit = first_limit + r % n + 1;
        if (limit > cols) limit = cols;
        vec m8 = vset1(-INFINITY);
        int64_t j = 0;
        for (; j + VW <= limit; j += VW) m8 = vmax(m8, vload(x + j));
        float top = vmaxall(m8);
        for (; j < limit; j++) top = x[j] > top ? x[j] : top;
        const vec shift = vset1(top * scale), sc = vset1(scale);
        vec s8 = vzero();
        for (j = 0; j + VW <= limit; j += VW) {
            const vec e = vexp(vfmsub(vload(x + j), sc, shift));
            vstore(x + j, e);
            s8 = vadd(s8, e);
        }
        float sum = vsum(s8);
        for (; j < limit; j++) {
            const float e = expf(x[j] * scale - top * scale);
            x[j] = e;
            sum += e;
        }
        const vec inv = vset1(1.0f / sum);
        for (j = 0; j + VW <= limit; j += VW) vstore(x + j, vmul(vload(x + j), inv));
        for (; j < limit; j++) x[j] *= 1.0f / sum;
        for (; j < cols; j++) x[j] = 0.0f;
    }
}

/* out (rows, hidden) = silu(gate) * up, where each row of h (rows, 2 hidden) is gate then up. */
void silu_mul_rows(const float *h, float *out, int64_t rows, int hidden, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = h + r * 2 * (int64_t)hidden, *u = g + hidden;
        float *o = out + r * (int64_t)hidden;
        int i = 0;
        for (; i + VW <= hidden; i += VW) {
            const vec x = vload(g + i);
            const vec e = vexp(vmul(x, vset1(-1.0f)));
            vstore(o + i, vmul(vdiv(x, vadd(vset1(1.0f), e)), vload(u + i)));
        }
        for (; i < hidden; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}
#endif
