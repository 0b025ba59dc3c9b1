/* One batch-1 decoding step of the whole Transformer in C: token in, logits out.
 *
 * At batch 1 a step reads every weight once and does little arithmetic per byte, so its
 * speed is set by how fast the weights stream from memory. Through PyTorch, the per-op
 * dispatch (a dozen ops per layer) and MKL's matrix-vector product (which streams an
 * (out, in) weight at well under the machine's bandwidth on two cores) leave most of that
 * speed on the table. Here the step runs inside one OpenMP parallel region: each matmul
 * splits its output rows among the threads (kernels.h), the small per-token work (norms,
 * rotary embedding, the cache write) runs on one thread between barriers, and attention
 * splits the heads.
 *
 * Covers the families of lmforge.model.Transformer: LayerNorm or RMSNorm, learned or
 * rotary positions, GELU (tanh) or SwiGLU, optional biases, grouped-query attention,
 * a sliding window. Weights are fp32, int8 (per-row scale) or int4 (groups), per layer.
 * The caller owns every buffer: weights and the KV cache are the model's own tensors,
 * shared, never copied. Numerics follow the PyTorch reference (same formulas, fp32).
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

enum { F32 = 0, Q4 = 4, Q8 = 8 };

typedef struct {
    int kind, N, K, G;   /* G: int4 group size */
    const void *w;       /* fp32 (N, K) | int8 (N, K) | packed int4 (N, K/2) */
    const float *scale;  /* int8: (N,); int4: (N, K/G) */
    const uint8_t *zero; /* int4: (N, K/G) */
    const float *bias;   /* (N,) or NULL */
} Linear;

typedef struct {
    const float *norm1_w, *norm1_b, *norm2_w, *norm2_b; /* the _b are NULL for RMSNorm */
    Linear qkv, proj, up, down;
    float *k, *v; /* this layer's cache for batch row 0: (n_kv, capacity, head_dim) */
} Layer;

typedef struct {
    int n_layer, d_model, n_head, n_kv, head_dim, ffn, vocab, capacity, window; /* window 0: none */
    int layernorm, swiglu, rope;                                                /* flags */
    float eps;
    const float *tok_emb, *pos_emb;   /* (vocab, d), (context, d) or NULL */
    const float *rope_cos, *rope_sin; /* (context, head_dim), angles repeated in both halves */
    const float *norm_f_w, *norm_f_b;
    Linear lm_head;
    const Layer *layers;
    double *profile; /* NULL, or PROFILE_PHASES seconds that each step adds to (thread 0's view) */
} Model;

/* Where a step's time goes, for benchmarks/cpu_decode.py --profile: each phase ends at a
 * barrier, so a phase's time includes waiting for the slowest thread. */
enum { P_NORM, P_QKV, P_ROPE_CACHE, P_ATTENTION, P_PROJ, P_UP, P_ACTIVATION, P_DOWN, P_LM_HEAD, PROFILE_PHASES };

int decode_supported(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX2__
/* What the team shares within a step: activations and the quantized copy of the current
 * matmul input. */
typedef struct {
    float *x, *h, *qkv, *att, *up, *scores, *xs, *gsum;
    int8_t *xq;
} Work;

static int max_int(int a, int b) { return a > b ? a : b; }

/* Every thread of the team calls this; the output rows are split among them. y[n] is
 * W[n] . x + bias[n], added to y[n] when `accumulate` (a residual connection). */
static void matvec(const Linear *L, const float *x, float *y, int accumulate, Work *ws) {
    const int N = L->N, K = L->K;
    if (L->kind != F32) {
#pragma omp single
        {
            quantize_rows(x, 1, K, ws->xq, ws->xs);
            if (L->kind == Q4) group_sums(ws->xq, ws->xs, K, L->G, ws->gsum);
        }
    }
    const int groups = L->kind == Q4 ? K / L->G : 0;
#pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        float v;
        if (L->kind == F32) v = f32_row(x, K, (const float *)L->w + (size_t)n * K);
        else if (L->kind == Q8) v = q8_row(ws->xq, ws->xs, K, (const int8_t *)L->w + (size_t)n * K) * L->scale[n];
        else v = q4_row(ws->xq, ws->xs, ws->gsum, K, (const uint8_t *)L->w + (size_t)n * K / 2,
                        L->scale + (size_t)n * groups, L->zero + (size_t)n * groups, L->G);
        if (L->bias) v += L->bias[n];
        y[n] = accumulate ? y[n] + v : v;
    }
}

static void norm(const Model *m, const float *x, const float *w, const float *b, float *out) {
    const int d = m->d_model;
    if (m->layernorm) {
        float mean = 0.0f, var = 0.0f;
        for (int i = 0; i < d; i++) mean += x[i];
        mean /= d;
        for (int i = 0; i < d; i++) var += (x[i] - mean) * (x[i] - mean);
        float inv = 1.0f / sqrtf(var / d + m->eps);
        for (int i = 0; i < d; i++) out[i] = (x[i] - mean) * inv * w[i] + b[i];
    } else {
        float ss = 0.0f;
        for (int i = 0; i < d; i++) ss += x[i] * x[i];
        float inv = 1.0f / sqrtf(ss / d + m->eps);
        for (int i = 0; i < d; i++) out[i] = w[i] * (x[i] * inv);
    }
}

/* x * cos + rotate_half(x) * sin, in place, for one head. */
static void rotate(float *x, const float *cos, const float *sin, int d) {
    const int half = d / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static float dot(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Attention of one new query per head over the cached slots lo..pos (team-shared). */
static void attend(const Model *m, const Layer *L, int pos, Work *ws) {
    const int hd = m->head_dim, group = m->n_head / m->n_kv, cap = m->capacity;
    const int lo = m->window > 0 && pos - m->window + 1 > 0 ? pos - m->window + 1 : 0;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp for schedule(static)
    for (int h = 0; h < m->n_head; h++) {
        const float *q = ws->qkv + (size_t)h * hd;
        const float *k = L->k + (size_t)(h / group) * cap * hd, *v = L->v + (size_t)(h / group) * cap * hd;
        float *s = ws->scores + (size_t)h * cap, *out = ws->att + (size_t)h * hd;
        float top = -INFINITY, total = 0.0f;
        for (int j = lo; j <= pos; j++) {
            s[j] = dot(q, k + (size_t)j * hd, hd) * scale;
            top = fmaxf(top, s[j]);
        }
        for (int j = lo; j <= pos; j++) total += s[j] = expf(s[j] - top);
        for (int i = 0; i < hd; i++) out[i] = 0.0f;
        for (int j = lo; j <= pos; j++) {
            __m256 p = _mm256_set1_ps(s[j] / total);
            const float *vj = v + (size_t)j * hd;
            int i = 0;
            for (; i + 8 <= hd; i += 8)
                _mm256_storeu_ps(out + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + i), _mm256_loadu_ps(out + i)));
            for (; i < hd; i++) out[i] += s[j] / total * vj[i];
        }
    }
}

static float gelu_tanh(float x) { return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))); }

static void mlp_activation(const Model *m, Work *ws) {
    const int f = m->ffn;
#pragma omp for schedule(static)
    for (int i = 0; i < f; i++) {
        if (m->swiglu) {
            float g = ws->up[i];
            ws->up[i] = g / (1.0f + expf(-g)) * ws->up[f + i];
        } else {
            ws->up[i] = gelu_tanh(ws->up[i]);
        }
    }
}

/* Rotary embedding of this token's query and key heads, and its key/value into the cache. */
static void rope_and_cache(const Model *m, const Layer *L, int pos, Work *ws) {
    const int hd = m->head_dim, nq = m->n_head * hd, nkv = m->n_kv * hd;
    float *q = ws->qkv, *k = ws->qkv + nq, *v = ws->qkv + nq + nkv;
    if (m->rope) {
        const float *cos = m->rope_cos + (size_t)pos * hd, *sin = m->rope_sin + (size_t)pos * hd;
        for (int h = 0; h < m->n_head; h++) rotate(q + h * hd, cos, sin, hd);
        for (int h = 0; h < m->n_kv; h++) rotate(k + h * hd, cos, sin, hd);
    }
    for (int h = 0; h < m->n_kv; h++) {
        memcpy(L->k + ((size_t)h * m->capacity + pos) * hd, k + h * hd, sizeof(float) * hd);
        memcpy(L->v + ((size_t)h * m->capacity + pos) * hd, v + h * hd, sizeof(float) * hd);
    }
}

/* The token at position `pos` (its keys and values go to cache slot `pos`; slots 0..pos-1
 * hold the sequence so far) gives `logits` (vocab,). `threads` <= 0: OpenMP's default. */
void decode_step(const Model *m, int token, int pos, int threads, float *logits) {
    const int d = m->d_model, hd = m->head_dim;
    const int width = (m->n_head + 2 * m->n_kv) * hd, up_width = (m->swiglu ? 2 : 1) * m->ffn;
    const int widest = max_int(max_int(d, m->ffn), m->n_head * hd);
    Work ws;
    ws.x = malloc(sizeof(float) * d);
    ws.h = malloc(sizeof(float) * d);
    ws.qkv = malloc(sizeof(float) * width);
    ws.att = malloc(sizeof(float) * m->n_head * hd);
    ws.up = malloc(sizeof(float) * up_width);
    ws.scores = malloc(sizeof(float) * (size_t)m->n_head * m->capacity);
    ws.xq = malloc((size_t)widest + QK);
    ws.xs = malloc(sizeof(float) * (widest / QK + 1));
    ws.gsum = malloc(sizeof(float) * (widest / QK + 1));

    for (int i = 0; i < d; i++)
        ws.x[i] = m->tok_emb[(size_t)token * d + i] + (m->pos_emb ? m->pos_emb[(size_t)pos * d + i] : 0.0f);

    double *prof = m->profile, last = prof ? omp_get_wtime() : 0.0;
#define MARK(phase)                                 \
    if (prof) {                                     \
        _Pragma("omp master") {                     \
            double now = omp_get_wtime();           \
            prof[phase] += now - last, last = now;  \
        }                                           \
    }
#pragma omp parallel num_threads(threads > 0 ? threads : omp_get_max_threads())
    {
        for (int l = 0; l < m->n_layer; l++) {
            const Layer *L = &m->layers[l];
#pragma omp single
            norm(m, ws.x, L->norm1_w, L->norm1_b, ws.h);
            MARK(P_NORM)
            matvec(&L->qkv, ws.h, ws.qkv, 0, &ws);
            MARK(P_QKV)
#pragma omp single
            rope_and_cache(m, L, pos, &ws);
            MARK(P_ROPE_CACHE)
            attend(m, L, pos, &ws);
            MARK(P_ATTENTION)
            matvec(&L->proj, ws.att, ws.x, 1, &ws);
            MARK(P_PROJ)
#pragma omp single
            norm(m, ws.x, L->norm2_w, L->norm2_b, ws.h);
            MARK(P_NORM)
            matvec(&L->up, ws.h, ws.up, 0, &ws);
            MARK(P_UP)
            mlp_activation(m, &ws);
            MARK(P_ACTIVATION)
            matvec(&L->down, ws.up, ws.x, 1, &ws);
            MARK(P_DOWN)
        }
#pragma omp single
        norm(m, ws.x, m->norm_f_w, m->norm_f_b, ws.h);
        MARK(P_NORM)
        matvec(&m->lm_head, ws.h, logits, 0, &ws);
        MARK(P_LM_HEAD)
    }
#undef MARK
    free(ws.x), free(ws.h), free(ws.qkv), free(ws.att), free(ws.up), free(ws.scores);
    free(ws.xq), free(ws.xs), free(ws.gsum);
}
#else
void decode_step(const void *m, int token, int pos, int threads, float *logits) {
    (void)m, (void)token, (void)pos, (void)threads, (void)logits; /* decode_supported() is 0 */
}
#endif
