/* One decoding step of the whole Transformer in C: a token per sequence in, logits out.
 *
 * At batch 1 a step reads every weight once and does little arithmetic per byte, so its
 * speed is set by how fast the weights stream from memory. Through PyTorch, the per-op
 * dispatch (a dozen ops per layer) and MKL's matrix-vector product (which streams an
 * (out, in) weight at well under the machine's bandwidth on two cores) leave most of that
 * speed on the table. Here the step runs inside one OpenMP parallel region: each matmul
 * shares its output rows among the threads (in chunks), and so do the norms, the rotary
 * embedding and cache write (by sequence) and attention (by sequence and head), each
 * phase ending when all its items are done (see Team). Several sequences (a serving
 * engine's running batch) share each weight row while it is in cache, so a batch costs
 * little more memory traffic than one.
 *
 * Covers the families of lmforge.model.Transformer: LayerNorm or RMSNorm, learned or
 * rotary positions, GELU (tanh) or SwiGLU, optional biases, grouped-query attention,
 * sliding windows (per layer), per-head q/k norms, Gemma's scaled embeddings, GeGLU,
 * post-attention/MLP norms and soft-capped scores, and mixture-of-experts MLPs (each row's experts
 * chosen by its router; the rows are grouped by expert so each expert's weights are read
 * once per step for all the rows that chose it). Weights are fp32, int8 (per-row scale), int4 (groups) or
 * 2:4 sparse fp32 in compact form (sparse.h), per layer.
 * The caller owns every buffer: weights and the KV cache are the model's own tensors,
 * shared, never copied. Numerics follow the PyTorch reference (same formulas, fp32).
 *
 * The structs Python passes in are declared in decode.h. The batched matmuls, the part that
 * differs by instruction set, are in decode_avx512.h and decode_avx2.h, one of which is
 * included below.
 */
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "kernels.h"

#ifdef __AVX2__
static inline size_t cache_base(const Rows *r, int b) {
    return (size_t)(r->cache_row ? r->cache_row[b] : b) * r->row_stride;
}

/* How a step's team shares out each phase's work (~75 phases per step at 8 layers): a phase
 * is a number of items (rows, weight-row chunks, heads), each thread starts on its own
 * contiguous share of them, and one that runs out takes what is left from the back of the
 * others' shares; a phase ends when all its items are finished, wherever they ran.
 *
 * Why not OpenMP's static loops and barriers: in a server the step's threads share the
 * cores with the event loop (and, in our benchmark, the load generator). When the kernel
 * runs one of those on a step thread's core, a static share waits for that thread, and a
 * barrier waits for it even when it has nothing left to do; here the other thread takes
 * the share over and a descheduled thread holds up nobody unless it is inside an item.
 * (OpenMP's barrier also sleeps in the kernel after a hundred spins when the process holds
 * more OpenMP threads than CPUs, which a server always does: PyTorch's team idles beside
 * the engine thread's.) The waits spin, yielding the CPU after ~0.1 ms. */
typedef struct {
    _Alignas(64) atomic_ullong v; /* a cache line each: threads write them concurrently */
} Line;

typedef struct {
    Line *taken; /* [phase][owner]: items taken from the front (low 32 bits) and back of owner's share */
    Line *done;  /* [thread]: items the thread has finished this step */
    int threads, phases; /* the most the team and the step may have */
} Team;

typedef struct { /* one thread's place in the step */
    Team *team;
    int t, n, phase, count, pending; /* thread, team size, phase, its items, an item unfinished */
    unsigned long long finished, target; /* this thread's items finished; all threads', at phase end */
} Worker;

/* The next item of the phase for this thread, or -1 when none is left; counts the previous
 * one as finished. FOR_ITEMS opens a phase of `count` items; end_phase waits for all of them. */
static int take(Worker *w) {
    if (w->pending) {
        w->pending = 0;
        atomic_store_explicit(&w->team->done[w->t].v, ++w->finished, memory_order_release);
    }
    for (int k = 0; k < w->n; k++) { /* its own share from the front, then the others' from the back */
        const int owner = (w->t + k) % w->n;
        const int lo = (int)((long)w->count * owner / w->n), len = (int)((long)w->count * (owner + 1) / w->n) - lo;
        atomic_ullong *taken = &w->team->taken[(size_t)w->phase * w->team->threads + owner].v;
        unsigned long long old = atomic_load_explicit(taken, memory_order_relaxed);
        for (;;) {
            const unsigned front = (unsigned)old, back = (unsigned)(old >> 32);
            if ((long)front + back >= len) break;
            if (atomic_compare_exchange_weak_explicit(taken, &old, old + (k == 0 ? 1ull : 1ull << 32),
                                                      memory_order_relaxed, memory_order_relaxed)) {
                w->pending = 1;
                return k == 0 ? lo + (int)front : lo + len - 1 - (int)back;
            }
        }
    }
    return -1;
}

static inline int open_phase(Worker *w, int count) {
    if (w->phase >= w->team->phases) abort(); /* decode_step counts too few phases: a bug, not an input */
    w->count = count, w->target += (unsigned long long)count;
    return take(w);
}

#define FOR_ITEMS(w, i, count) for (int i = open_phase(w, count); i >= 0; i = take(w))

static void end_phase(Worker *w) {
    for (int spins = 0;; spins++) {
        unsigned long long all = 0;
        for (int t = 0; t < w->n; t++) all += atomic_load_explicit(&w->team->done[t].v, memory_order_acquire);
        if (all >= w->target) break;
        if (spins < 4096) _mm_pause();
        else sched_yield();
    }
    w->phase++;
}

/* What the team shares within a step: activations (B rows each) and the quantized copy of
 * the current matmul input. */
typedef struct {
    float *x, *h, *qkv, *att, *up, *act, *scores, *xs, *xw, *gsum;
    int8_t *xq;
    /* mixture of experts: router logits (B, n_experts); per (row, choice) its expert, weight
     * and place in the grouped rows; expert e's rows are offset[e]..offset[e+1]-1 of the
     * grouped inputs gx and outputs eout, order[i] the (row, choice) at grouped row i */
    float *router, *weight, *gx, *eout;
    int *chosen, *place, *order, *offset;
    float *sgate, *sup, *sact, *sout; /* the shared expert's gate logit, up, activation and output per row */
    int lowbit_tiles; /* int8/int4 matmuls in tiles of four rows (see lowbit_tiles_pay) */
    /* LoRA: the rows grouped by adapter (adapter a's are lora_order[lora_offset[a]..lora_offset[a+1]-1])
     * and each row's A x (lora_rank floats a row) */
    int *lora_order, *lora_offset, lora_rank;
    float *lora_t;
} Work;

#define PREFETCH_SLOTS 16 /* cache rows ahead that attention prefetches */

static int max_int(int a, int b) { return a > b ? a : b; }

/* y[b,n] = v + bias[n], or y[b,n] += that when `accumulate` (a residual connection). */
static inline void put(const Linear *L, float *y, int N, int b, int n, float v, int accumulate) {
    if (L->bias) v += L->bias[n];
    float *out = y + (size_t)b * N + n;
    *out = accumulate ? *out + v : v;
}

#define CHUNK_ROWS 32 /* weight rows per work item of a matmul: 64 KB at K = 512 */

/* One int8/int4 weight row against the quantized activations of sequence b (in layout U), scaled. */
static inline float lowbit_row(const Linear *L, const Work *ws, int n, int b, int U) {
    const int K = L->K, blocks = K / QK;
    const int8_t *xq = ws->xq + (size_t)b * K;
    const float *xs = ws->xs + (size_t)b * blocks;
    if (L->kind == Q8) return q8_row(xq, xs, K, (const int8_t *)L->w + (size_t)n * K) * L->scale[n];
    const int groups = K / L->G;
    return q4_row(xq, xs, ws->xw + (size_t)b * K / 8, ws->gsum + (size_t)b * groups, K,
                  (const uint8_t *)L->w + (size_t)n * K / 2, L->scale + (size_t)n * groups, L->zero + (size_t)n * groups,
                  L->G, U);
}

/* The layout (kernels.h) of the activations that the row kernels read for L. */
static inline int row_layout(const Linear *L) { return L->kind == Q4 ? q4_unit(L->G) : QK; }

/* The batched matmuls, one file per instruction set: each defines matvec_f32_batch, and
 * decode_avx512.h with VNNI also matvec_lowbit_batch. */
#ifdef __AVX512F__
#include "decode_avx512.h"
#else
#include "decode_avx2.h"
#endif
#include "sparse.h" /* the 2:4 matmul (matvec_s24), on the ISA's dense tiles */

/* The layout of the activations that the int8/int4 matmul of B rows reads: the row kernels'
 * (an int4 one reads them interleaved), or the tiles' blocks of 32 in order. */
static inline int lowbit_layout(const Linear *L, const Work *ws, int B) {
#ifdef LOWBIT_TILE
    if (ws->lowbit_tiles && B >= ROW_KERNEL_BELOW) return QK;
#else
    (void)ws, (void)B;
#endif
    return row_layout(L);
}

/* Every thread of the team calls this; the output rows n are shared among them in chunks,
 * and each weight row, once read, serves all B activation rows from the cache. y[b,n] is
 * W[n] . x[b] + bias[n], added to y[b,n] when `accumulate` (a residual connection).
 * Like every phase below, it returns when this thread finds nothing left to do: the step
 * waits for the phase's end (end_phase) after it. */
static void matvec(const Linear *L, const float *x, float *y, int B, int accumulate, Work *ws, Worker *wk) {
    const int N = L->N, K = L->K, groups = L->kind == Q4 ? K / L->G : 0;
    if (L->kind == S24) { /* fp32 activations, each weight row read once for all B */
        matvec_s24(L, x, y, B, accumulate, wk);
        return;
    }
    if (L->kind == F32 && B >= 4) {
        matvec_f32_batch(L, x, y, B, accumulate, wk);
        return;
    }
    const int U = L->kind == F32 ? QK : lowbit_layout(L, ws, B);
    if (L->kind != F32) { /* int8 activations for the int8/int4 weights, a row per item */
        FOR_ITEMS(wk, b, B) {
            quantize_rows(x + (size_t)b * K, 1, K, U, ws->xq + (size_t)b * K, ws->xs + (size_t)b * (K / QK));
            if (L->kind == Q4)
                group_sums(ws->xq + (size_t)b * K, ws->xs + (size_t)b * (K / QK), K, L->G, U,
                           ws->gsum + (size_t)b * groups, ws->xw + (size_t)b * K / 8);
        }
        end_phase(wk);
    }
#ifdef LOWBIT_TILE
    if (L->kind != F32 && ws->lowbit_tiles) {
        matvec_lowbit_batch(L, ws, y, B, accumulate, wk);
        return;
    }
#endif
    FOR_ITEMS(wk, item, (N + CHUNK_ROWS - 1) / CHUNK_ROWS) {
        const int end = (item + 1) * CHUNK_ROWS < N ? (item + 1) * CHUNK_ROWS : N;
        for (int n = item * CHUNK_ROWS; n < end; n++)
            for (int b = 0; b < B; b++)
                put(L, y, N, b, n, L->kind == F32 ? f32_row(x + (size_t)b * K, K, (const float *)L->w + (size_t)n * K)
                                                  : lowbit_row(L, ws, n, b, U), accumulate);
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

static void norm_rows(const Model *m, const float *x, const float *w, const float *bias, float *out, int B, Worker *wk) {
    FOR_ITEMS(wk, b, B) norm(m, x + (size_t)b * m->d_model, w, bias, out + (size_t)b * m->d_model);
}

/* x += w * y / rms(y) per row: gemma2/3's normalized attention or MLP output joining the residual. */
static void add_normed_rows(const Model *m, const float *y, const float *w, float *x, int B, Worker *wk) {
    const int d = m->d_model;
    FOR_ITEMS(wk, b, B) {
        const float *yb = y + (size_t)b * d;
        float *xb = x + (size_t)b * d, ss = 0.0f;
        for (int i = 0; i < d; i++) ss += yb[i] * yb[i];
        const float inv = 1.0f / sqrtf(ss / d + m->eps);
        for (int i = 0; i < d; i++) xb[i] += w[i] * (yb[i] * inv);
    }
}

/* x * w / rms(x), in place, for one head (qwen3's q/k norms; fp32 as the reference's). */
static void head_norm(float *x, const float *w, int d, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / d + eps);
    for (int i = 0; i < d; i++) x[i] = w[i] * (x[i] * inv);
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

/* q . k_j for four consecutive cached keys (rows of hd floats) in four independent
 * accumulators: one key at a time, each FMA waited on the one before (a third of the
 * attention phase at batch 16). */
static inline __m128 dot4(const float *q, const float *k, int hd) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 8 <= hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + hd + i), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * hd + i), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * hd + i), a3);
    }
    __m128 d = hsum4x8(a0, a1, a2, a3);
    if (i < hd) { /* head sizes that are not a multiple of 8 */
        float t[4];
        _mm_storeu_ps(t, d);
        for (; i < hd; i++)
            for (int j = 0; j < 4; j++) t[j] += q[i] * k[(size_t)j * hd + i];
        d = _mm_loadu_ps(t);
    }
    return d;
}

static float dot(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += alpha * x over n floats. */
static inline void axpy(float alpha, const float *x, float *y, int n) {
    const __m256 a = _mm256_set1_ps(alpha);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += alpha * x[i];
}

/* y[b] += B (A x[b]) for each row b that decodes with an adapter updating this linear (`which`
 * of LORA_*; x (B, K), y (B, N)). One item per adapter: rows are grouped by adapter, so each
 * adapter's A and B are read once for all of its rows (a segmented LoRA matmul, as S-LoRA and
 * Punica do it), and the base matmul before it ran once for the whole batch. */
static void lora_update(const Model *m, const Layer *L, int which, int N, int K, const float *x, float *y, Work *ws,
                        Worker *wk) {
    FOR_ITEMS(wk, a, m->n_adapters) {
        const int lo = ws->lora_offset[a], hi = ws->lora_offset[a + 1];
        const Lora *P = &L->lora[(size_t)a * LORA_LINEARS + which];
        if (lo == hi || P->rank == 0) continue;
        const int R = P->rank * P->slices;
        for (int j = 0; j < R; j++) /* the shrink: each row of A against every row's input */
            for (int i = lo; i < hi; i++) {
                const int b = ws->lora_order[i];
                ws->lora_t[(size_t)b * ws->lora_rank + j] = dot(P->a + (size_t)j * K, x + (size_t)b * K, K);
            }
        const float *bt = P->bt;
        for (int s = 0; s < P->slices; s++) { /* the expand: each row of B_s^T, scaled by every row's (A x)[j] */
            const int start = P->cols[2 * s], size = P->cols[2 * s + 1];
            for (int j = s * P->rank; j < (s + 1) * P->rank; j++, bt += size)
                for (int i = lo; i < hi; i++) {
                    const int b = ws->lora_order[i];
                    axpy(ws->lora_t[(size_t)b * ws->lora_rank + j], bt, y + (size_t)b * N + start, size);
                }
        }
    }
}

/* Attention of each row's new query, per head, over its cached slots (team-shared). */
static void attend(const Model *m, const Layer *L, const Rows *r, Work *ws, Worker *wk) {
    const int hd = m->head_dim, group = m->n_head / m->n_kv, cap = m->capacity, width = (m->n_head + 2 * m->n_kv) * hd;
    const float scale = m->attn_scale, softcap = m->attn_softcap;
    const size_t row_bytes = sizeof(float) * hd;
    FOR_ITEMS(wk, bh, r->B * m->n_head) {
        const int b = bh / m->n_head, h = bh % m->n_head, end = r->slot[b];
        int lo = r->first[b];
        if (L->window > 0 && end - L->window + 1 > lo) lo = end - L->window + 1;
        const float *q = ws->qkv + (size_t)b * width + (size_t)h * hd;
        const size_t base = cache_base(r, b) + (size_t)(h / group) * cap * hd;
        const float *k = L->k + base, *v = L->v + base;
        float *s = ws->scores + (size_t)bh * cap, *out = ws->att + (size_t)bh * hd;
        /* The cache rows are read once and come from memory: prefetch the keys ahead, and
         * each slot's values while its key is scored, for the weighted sum that follows. */
        for (int j = lo; j < lo + PREFETCH_SLOTS && j <= end; j++)
            for (size_t c = 0; c < row_bytes; c += 64) _mm_prefetch((const char *)(k + (size_t)j * hd) + c, _MM_HINT_T0);
        __m128 top4 = _mm_set1_ps(-INFINITY);
        int j = lo;
        for (; j + 4 <= end + 1; j += 4) {
            const char *kp = (const char *)(k + (size_t)(j + PREFETCH_SLOTS) * hd), *vp = (const char *)(v + (size_t)j * hd);
            for (size_t c = 0; c < 4 * row_bytes; c += 64) _mm_prefetch(kp + c, _MM_HINT_T0), _mm_prefetch(vp + c, _MM_HINT_T0);
            const __m128 d = _mm_mul_ps(dot4(q, k + (size_t)j * hd, hd), _mm_set1_ps(scale));
            _mm_storeu_ps(s + j, d);
            top4 = _mm_max_ps(top4, d);
        }
        top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
        float top = fmaxf(_mm_cvtss_f32(top4), _mm_cvtss_f32(_mm_movehdup_ps(top4)));
        for (; j <= end; j++) top = fmaxf(top, s[j] = dot(q, k + (size_t)j * hd, hd) * scale);
        if (softcap > 0.0f) { /* cap * tanh(s / cap): monotonic, so the largest stays the largest */
            for (j = lo; j <= end; j++) s[j] = softcap * tanhf(s[j] / softcap);
            top = softcap * tanhf(top / softcap);
        }
        /* exponentials eight at a time (exp8: expf's accuracy) */
        __m256 sum8 = _mm256_setzero_ps();
        const __m256 top8 = _mm256_set1_ps(top);
        for (j = lo; j + 8 <= end + 1; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), top8));
            _mm256_storeu_ps(s + j, e);
            sum8 = _mm256_add_ps(sum8, e);
        }
        float total = hsum(sum8);
        for (; j <= end; j++) total += s[j] = expf(s[j] - top);
        const float inv = 1.0f / total;
        for (int i = 0; i < hd; i++) out[i] = 0.0f;
        j = lo;
        for (; j + 4 <= end + 1; j += 4) { /* four slots per pass over `out` */
            const __m256 p0 = _mm256_set1_ps(s[j] * inv), p1 = _mm256_set1_ps(s[j + 1] * inv);
            const __m256 p2 = _mm256_set1_ps(s[j + 2] * inv), p3 = _mm256_set1_ps(s[j + 3] * inv);
            const float *v0 = v + (size_t)j * hd, *v1 = v0 + hd, *v2 = v1 + hd, *v3 = v2 + hd;
            int i = 0;
            for (; i + 8 <= hd; i += 8) {
                __m256 o = _mm256_loadu_ps(out + i);
                o = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + i), o);
                o = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1 + i), o);
                o = _mm256_fmadd_ps(p2, _mm256_loadu_ps(v2 + i), o);
                o = _mm256_fmadd_ps(p3, _mm256_loadu_ps(v3 + i), o);
                _mm256_storeu_ps(out + i, o);
            }
            for (; i < hd; i++)
                out[i] += s[j] * inv * v0[i] + s[j + 1] * inv * v1[i] + s[j + 2] * inv * v2[i] + s[j + 3] * inv * v3[i];
        }
        for (; j <= end; j++) {
            const __m256 p = _mm256_set1_ps(s[j] * inv);
            const float *vj = v + (size_t)j * hd;
            int i = 0;
            for (; i + 8 <= hd; i += 8)
                _mm256_storeu_ps(out + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + i), _mm256_loadu_ps(out + i)));
            for (; i < hd; i++) out[i] += s[j] * inv * vj[i];
        }
    }
}

/* act = silu(gate) * up (SwiGLU) or gelu_tanh(h), both x times a sigmoid: silu's of the
 * gate itself, gelu's from kernels.h (the one training's GELU uses). Shared out in runs of
 * 512 features of one row (whole vectors, one division per vector). */
static void mlp_activation(const Model *m, const float *up, float *act, int f, int B, Worker *wk) {
    const int stride = (m->swiglu ? 2 : 1) * f, runs = (f + 511) / 512;
    const __m256 one = _mm256_set1_ps(1.0f);
    FOR_ITEMS(wk, t, B * runs) {
        const int b = t / runs, lo = (t % runs) * 512, hi = lo + 512 < f ? lo + 512 : f;
        const float *row = up + (size_t)b * stride;
        float *out = act + (size_t)b * f;
        int i = lo;
        for (; i + 8 <= hi; i += 8) {
            const __m256 x = _mm256_loadu_ps(row + i);
            if (m->swiglu) {
                const __m256 sig = m->gelu_gate ? gelu_sigmoid(x)
                                                : _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
                _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(row + f + i)));
            } else {
                _mm256_storeu_ps(out + i, _mm256_mul_ps(x, gelu_sigmoid(x)));
            }
        }
        for (; i < hi; i++) {
            const float sig = m->swiglu && !m->gelu_gate ? 1.0f / (1.0f + expf(-row[i])) : gelu_sigmoid1(row[i]);
            out[i] = row[i] * sig * (m->swiglu ? row[f + i] : 1.0f);
        }
    }
}

/* Rotary embedding of each row's query and key heads, and its key/value into its cache row. */
static void rope_and_cache(const Model *m, const Layer *L, const Rows *r, Work *ws, Worker *wk) {
    const int hd = m->head_dim, nq = m->n_head * hd, nkv = m->n_kv * hd, width = nq + 2 * nkv;
    FOR_ITEMS(wk, b, r->B) {
        float *q = ws->qkv + (size_t)b * width, *k = q + nq, *v = q + nq + nkv;
        if (L->q_norm) {
            for (int h = 0; h < m->n_head; h++) head_norm(q + h * hd, L->q_norm, hd, m->eps);
            for (int h = 0; h < m->n_kv; h++) head_norm(k + h * hd, L->k_norm, hd, m->eps);
        }
        if (m->rope) {
            const float *table_cos = L->rope_cos ? L->rope_cos : m->rope_cos, *table_sin = L->rope_sin ? L->rope_sin : m->rope_sin;
            const float *cos = table_cos + (size_t)r->pos[b] * hd, *sin = table_sin + (size_t)r->pos[b] * hd;
            for (int h = 0; h < m->n_head; h++) rotate(q + h * hd, cos, sin, hd);
            for (int h = 0; h < m->n_kv; h++) rotate(k + h * hd, cos, sin, hd);
        }
        for (int h = 0; h < m->n_kv; h++) {
            size_t at = cache_base(r, b) + ((size_t)h * m->capacity + r->slot[b]) * hd;
            memcpy(L->k + at, k + h * hd, sizeof(float) * hd);
            memcpy(L->v + at, v + h * hd, sizeof(float) * hd);
        }
    }
}

/* Bytes of L's weights where it is of `kind` (Q8 or Q4), else 0. */
static size_t lowbit_bytes(const Linear *L, int kind) { return L->kind == kind ? (size_t)L->N * L->K * kind / 8 : 0; }

/* Each row's experts: a softmax over its router logits, the top_k most probable (renormalized
 * to sum to 1 with norm_topk), then the (row, choice) pairs grouped by expert, rows in order
 * within each group. One item: it is a few hundred operations. */
static void route(const Model *m, Work *ws, int B) {
    const int E = m->n_experts, k = m->top_k;
    for (int e = 0; e <= E; e++) ws->offset[e] = 0;
    for (int b = 0; b < B; b++) {
        float *p = ws->router + (size_t)b * E, top = -INFINITY, total = 0.0f, picked = 0.0f;
        for (int e = 0; e < E; e++) top = fmaxf(top, p[e]);
        for (int e = 0; e < E; e++) total += p[e] = expf(p[e] - top);
        for (int j = 0; j < k; j++) { /* the most probable expert not yet chosen (the lowest on a tie) */
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= ws->chosen[b * k + i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            ws->chosen[b * k + j] = best, ws->weight[b * k + j] = p[best] / total;
            picked += p[best] / total;
            ws->offset[best + 1]++;
        }
        if (m->norm_topk)
            for (int j = 0; j < k; j++) ws->weight[b * k + j] /= picked;
    }
    for (int e = 0; e < E; e++) ws->offset[e + 1] += ws->offset[e];
    int *fill = ws->place + B * k; /* scratch: the next free grouped row of each expert */
    for (int e = 0; e < E; e++) fill[e] = ws->offset[e];
    for (int b = 0; b < B; b++)
        for (int j = 0; j < k; j++) {
            const int at = fill[ws->chosen[b * k + j]]++;
            ws->place[b * k + j] = at, ws->order[at] = b * k + j;
        }
}

/* x += the weighted sum of row b's experts' outputs, summed in the order of the experts'
 * numbers as the reference does, plus the shared expert's gated output (then added to the
 * residual). */
static void combine(const Model *m, Work *ws, int b) {
    const int d = m->d_model, k = m->top_k;
    int js[16];
    for (int j = 0; j < k; j++) js[j] = j;
    for (int i = 1; i < k; i++) /* the choices by expert number */
        for (int j = i; j > 0 && ws->chosen[b * k + js[j]] < ws->chosen[b * k + js[j - 1]]; j--) {
            const int t = js[j];
            js[j] = js[j - 1], js[j - 1] = t;
        }
    float *x = ws->x + (size_t)b * d;
    const float gate = m->shared_ffn ? 1.0f / (1.0f + expf(-ws->sgate[b])) : 0.0f;
    for (int i = 0; i < d; i++) {
        float sum = 0.0f;
        for (int j = 0; j < k; j++)
            sum += ws->eout[(size_t)ws->place[b * k + js[j]] * d + i] * ws->weight[b * k + js[j]];
        if (m->shared_ffn) sum += ws->sout[(size_t)b * d + i] * gate;
        x[i] += sum;
    }
}

/* The largest cache one core sees, as sysfs lists it (cpuid's figure can be a whole socket's,
 * e.g. 384 MB in a VM whose core shares 32 MB); 32 MB where sysfs says nothing. */
static long cache_bytes(void) {
    long largest = 0;
    for (int i = 0; i < 8; i++) {
        char path[64];
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
        FILE *f = fopen(path, "r");
        if (!f) break;
        long size = 0;
        char unit = 0;
        if (fscanf(f, "%ld%c", &size, &unit) >= 1) {
            size <<= unit == 'K' ? 10 : unit == 'M' ? 20 : 0;
            largest = size > largest ? size : largest;
        }
        fclose(f);
    }
    return largest > 0 ? largest : 32L << 20;
}

/* Bytes of the model's weights of `kind` (Q8 or Q4). */
static size_t model_bytes(const Model *m, int kind) {
    size_t total = lowbit_bytes(&m->lm_head, kind);
    for (int l = 0; l < m->n_layer; l++) {
        const Layer *L = &m->layers[l];
        total += lowbit_bytes(&L->qkv, kind) + lowbit_bytes(&L->proj, kind) + lowbit_bytes(&L->up, kind) +
                 lowbit_bytes(&L->down, kind);
        if (L->experts)
            for (int e = 0; e < 2 * m->n_experts; e++) total += lowbit_bytes(&L->experts[e], kind);
        total += lowbit_bytes(&L->shared_up, kind) + lowbit_bytes(&L->shared_down, kind);
    }
    return total;
}

/* Whether the int8/int4 matmuls take the four-row tiles. A batch does: each weight row then
 * serves several sequences. At batch 1 the tile's 512-bit products beat the int8 row kernel
 * (lowbit_row) while the quantized weights stay in the last-level cache; once they stream
 * from memory the row kernel's one sequential stream reads faster. The int4 row kernel, on
 * its interleaved activations, beats the tile in the cache too, except on the smallest models
 * (up to INT4_TILE_MAX_BYTES of int4 weights), where a step is short enough for the per-row
 * work (a reduction and the zero points per row, against one per four in the tile) to weigh
 * (benchmarks/quant_decode_sizes.py measures the sizes). */
#define INT4_TILE_MAX_BYTES ((size_t)8 << 20)
static int lowbit_tiles_pay(const Model *m, int B) {
    static long cache = 0; /* the same for every caller: a racing first write is harmless */
    if (B >= 4) return 1;
    if (cache == 0) cache = cache_bytes();
    const size_t q4 = model_bytes(m, Q4);
    return model_bytes(m, Q8) + q4 <= (size_t)cache && q4 <= INT4_TILE_MAX_BYTES;
}

/* One step for the B rows described by `r`: logits (B, vocab). `threads` <= 0: OpenMP's default. */
void decode_step(const Model *m, const Rows *r, int threads, float *logits) {
    const int d = m->d_model, hd = m->head_dim, B = r->B;
    const int width = (m->n_head + 2 * m->n_kv) * hd, up_width = (m->swiglu ? 2 : 1) * m->ffn;
    const int widest = max_int(max_int(max_int(d, m->ffn), m->n_head * hd), m->shared_ffn);
    const int E = m->n_experts, k = E ? m->top_k : 1, mlp_rows = B * k; /* an expert's rows: (row, choice) pairs */
    Work ws;
    ws.x = malloc(sizeof(float) * B * d);
    ws.h = malloc(sizeof(float) * B * d);
    ws.qkv = malloc(sizeof(float) * B * width);
    ws.att = malloc(sizeof(float) * B * m->n_head * hd);
    ws.up = malloc(sizeof(float) * mlp_rows * up_width);
    ws.act = malloc(sizeof(float) * mlp_rows * m->ffn);
    ws.scores = malloc(sizeof(float) * (size_t)B * m->n_head * m->capacity);
    ws.xq = malloc((size_t)mlp_rows * widest + QK);
    ws.xs = malloc(sizeof(float) * mlp_rows * (widest / QK + 1));
    ws.gsum = malloc(sizeof(float) * mlp_rows * (widest / QK + 1));
    ws.xw = malloc(sizeof(float) * mlp_rows * (widest / 8 + 1));
    ws.router = malloc(sizeof(float) * B * (E + 1));
    ws.weight = malloc(sizeof(float) * mlp_rows);
    ws.gx = malloc(sizeof(float) * (size_t)mlp_rows * d);
    ws.eout = malloc(sizeof(float) * (size_t)mlp_rows * d);
    ws.chosen = malloc(sizeof(int) * mlp_rows);
    ws.place = malloc(sizeof(int) * (mlp_rows + E + 1));
    ws.order = malloc(sizeof(int) * mlp_rows);
    ws.offset = malloc(sizeof(int) * (E + 2));
    ws.sgate = malloc(sizeof(float) * B);
    ws.sup = malloc(sizeof(float) * B * (2 * m->shared_ffn + 1));
    ws.sact = malloc(sizeof(float) * B * (m->shared_ffn + 1));
    ws.sout = malloc(sizeof(float) * B * d);
    ws.lowbit_tiles = lowbit_tiles_pay(m, B);
    /* LoRA: the rows grouped by adapter (a counting sort), and room for the largest rank */
    const int lora = r->adapter != NULL && m->n_adapters > 0, A = lora ? m->n_adapters : 0;
    ws.lora_offset = calloc(2 * A + 2, sizeof(int)); /* A + 1 offsets, then each group's next free place */
    ws.lora_order = malloc(sizeof(int) * (B + 1));
    ws.lora_rank = 1;
    for (int b = 0; lora && b < B; b++)
        if (r->adapter[b] >= 0 && r->adapter[b] < A) ws.lora_offset[r->adapter[b] + 1]++;
    for (int a = 0; a < A; a++) ws.lora_offset[a + 1] += ws.lora_offset[a];
    int *next = ws.lora_offset + A + 1;
    for (int a = 0; a < A; a++) next[a] = ws.lora_offset[a];
    for (int b = 0; lora && b < B; b++)
        if (r->adapter[b] >= 0 && r->adapter[b] < A) ws.lora_order[next[r->adapter[b]]++] = b;
    for (int l = 0; lora && l < m->n_layer; l++)
        for (int i = 0; m->layers[l].lora && i < A * LORA_LINEARS; i++)
            ws.lora_rank = max_int(ws.lora_rank, m->layers[l].lora[i].rank * m->layers[l].lora[i].slices);
    ws.lora_t = malloc(sizeof(float) * (size_t)B * ws.lora_rank);
    const int team_size = threads > 0 ? threads : omp_get_max_threads();
    /* at most: every matmul quantized, some logits rows wanted; a mixture of experts adds the
     * router and the routing, and two matmuls for each expert some row chose */
    const int experts_run = E < mlp_rows ? E : mlp_rows;
    const int phases = (15 + 4 + (E ? 6 + 4 * experts_run : 0) + (m->shared_ffn ? 7 : 0)) * m->n_layer + 4; /* 15: gemma's two post-norms; 4: LoRA */
    Team team = {aligned_alloc(64, sizeof(Line) * phases * team_size), aligned_alloc(64, sizeof(Line) * team_size),
                 team_size, phases};
    memset(team.taken, 0, sizeof(Line) * (size_t)phases * team_size);
    memset(team.done, 0, sizeof(Line) * team_size);

    for (int b = 0; b < B; b++)
        for (int i = 0; i < d; i++)
            ws.x[(size_t)b * d + i] = m->tok_emb[(size_t)r->token[b] * d + i] * m->embed_scale +
                                      (m->pos_emb ? m->pos_emb[(size_t)r->pos[b] * d + i] : 0.0f);

    double *prof = m->profile, last = prof ? omp_get_wtime() : 0.0;
#define SYNC(phase)                                \
    end_phase(&wk);                                \
    if (prof && wk.t == 0) { /* thread 0's view */ \
        double now = omp_get_wtime();              \
        prof[phase] += now - last, last = now;     \
    }
#pragma omp parallel num_threads(team_size)
    {
        Worker wk = {.team = &team, .t = omp_get_thread_num(), .n = omp_get_num_threads()};
        for (int l = 0; l < m->n_layer; l++) {
            const Layer *L = &m->layers[l];
            norm_rows(m, ws.x, L->norm1_w, L->norm1_b, ws.h, B, &wk);
            SYNC(P_NORM)
            matvec(&L->qkv, ws.h, ws.qkv, B, 0, &ws, &wk);
            SYNC(P_QKV)
            if (lora && L->lora) {
                lora_update(m, L, LORA_QKV, width, d, ws.h, ws.qkv, &ws, &wk);
                SYNC(P_LORA)
            }
            rope_and_cache(m, L, r, &ws, &wk);
            SYNC(P_ROPE_CACHE)
            attend(m, L, r, &ws, &wk);
            SYNC(P_ATTENTION)
            if (L->post_attn_w) { /* the output normalized, then added (h is free until norm2) */
                matvec(&L->proj, ws.att, ws.h, B, 0, &ws, &wk);
                SYNC(P_PROJ)
                if (lora && L->lora) {
                    lora_update(m, L, LORA_PROJ, d, m->n_head * hd, ws.att, ws.h, &ws, &wk);
                    SYNC(P_LORA)
                }
                add_normed_rows(m, ws.h, L->post_attn_w, ws.x, B, &wk);
                SYNC(P_NORM)
            } else {
                matvec(&L->proj, ws.att, ws.x, B, 1, &ws, &wk);
                SYNC(P_PROJ)
                if (lora && L->lora) {
                    lora_update(m, L, LORA_PROJ, d, m->n_head * hd, ws.att, ws.x, &ws, &wk);
                    SYNC(P_LORA)
                }
            }
            norm_rows(m, ws.x, L->norm2_w, L->norm2_b, ws.h, B, &wk);
            SYNC(P_NORM)
            if (L->experts) {
                matvec(&L->router, ws.h, ws.router, B, 0, &ws, &wk);
                SYNC(P_ROUTE)
                FOR_ITEMS(&wk, one, 1) route(m, &ws, B);
                SYNC(P_ROUTE)
                FOR_ITEMS(&wk, i, mlp_rows) /* each (row, choice)'s input to its expert's group */
                    memcpy(ws.gx + (size_t)i * d, ws.h + (size_t)(ws.order[i] / k) * d, sizeof(float) * d);
                SYNC(P_ROUTE)
                for (int e = 0; e < E; e++) /* the phases of the experts that some row chose */
                    if (ws.offset[e + 1] > ws.offset[e]) {
                        const int lo = ws.offset[e], n = ws.offset[e + 1] - lo;
                        matvec(&L->experts[2 * e], ws.gx + (size_t)lo * d, ws.up + (size_t)lo * up_width, n, 0, &ws, &wk);
                        SYNC(P_UP)
                    }
                mlp_activation(m, ws.up, ws.act, m->ffn, mlp_rows, &wk);
                SYNC(P_ACTIVATION)
                for (int e = 0; e < E; e++)
                    if (ws.offset[e + 1] > ws.offset[e]) {
                        const int lo = ws.offset[e], n = ws.offset[e + 1] - lo;
                        matvec(&L->experts[2 * e + 1], ws.act + (size_t)lo * m->ffn, ws.eout + (size_t)lo * d, n, 0,
                               &ws, &wk);
                        SYNC(P_DOWN)
                    }
                if (m->shared_ffn) { /* the expert every row runs, and its gate */
                    matvec(&L->shared_gate, ws.h, ws.sgate, B, 0, &ws, &wk);
                    SYNC(P_ROUTE)
                    matvec(&L->shared_up, ws.h, ws.sup, B, 0, &ws, &wk);
                    SYNC(P_UP)
                    mlp_activation(m, ws.sup, ws.sact, m->shared_ffn, B, &wk);
                    SYNC(P_ACTIVATION)
                    matvec(&L->shared_down, ws.sact, ws.sout, B, 0, &ws, &wk);
                    SYNC(P_DOWN)
                }
                FOR_ITEMS(&wk, b, B) combine(m, &ws, b);
                SYNC(P_ROUTE)
                continue;
            }
            matvec(&L->up, ws.h, ws.up, B, 0, &ws, &wk);
            SYNC(P_UP)
            if (lora && L->lora) {
                lora_update(m, L, LORA_UP, up_width, d, ws.h, ws.up, &ws, &wk);
                SYNC(P_LORA)
            }
            mlp_activation(m, ws.up, ws.act, m->ffn, B, &wk);
            SYNC(P_ACTIVATION)
            if (L->post_mlp_w) {
                matvec(&L->down, ws.act, ws.h, B, 0, &ws, &wk);
                SYNC(P_DOWN)
                if (lora && L->lora) {
                    lora_update(m, L, LORA_DOWN, d, m->ffn, ws.act, ws.h, &ws, &wk);
                    SYNC(P_LORA)
                }
                add_normed_rows(m, ws.h, L->post_mlp_w, ws.x, B, &wk);
                SYNC(P_NORM)
            } else {
                matvec(&L->down, ws.act, ws.x, B, 1, &ws, &wk);
                SYNC(P_DOWN)
                if (lora && L->lora) {
                    lora_update(m, L, LORA_DOWN, d, m->ffn, ws.act, ws.x, &ws, &wk);
                    SYNC(P_LORA)
                }
            }
        }
        /* Only the rows whose next token is wanted go through the output layer (a prompt fed
         * in the step needs its last row's logits only): gather them to the front of x. */
        int out = B;
        if (r->out_row) {
            out = r->n_out;
            FOR_ITEMS(&wk, one, 1) /* in order: row i moves down from out_row[i] >= i */
                for (int i = 0; i < out; i++)
                    memmove(ws.x + (size_t)i * d, ws.x + (size_t)r->out_row[i] * d, sizeof(float) * d);
            end_phase(&wk);
        }
        norm_rows(m, ws.x, m->norm_f_w, m->norm_f_b, ws.h, out, &wk);
        SYNC(P_NORM)
        matvec(&m->lm_head, ws.h, logits, out, 0, &ws, &wk);
        SYNC(P_LM_HEAD)
    }
#undef SYNC
    free(ws.x), free(ws.h), free(ws.qkv), free(ws.att), free(ws.up), free(ws.act), free(ws.scores);
    free(ws.xq), free(ws.xs), free(ws.xw), free(ws.gsum), free(team.taken), free(team.done);
    free(ws.router), free(ws.weight), free(ws.gx), free(ws.eout), free(ws.chosen), free(ws.place), free(ws.order);
    free(ws.offset), free(ws.sgate), free(ws.sup), free(ws.sact), free(ws.sout);
    free(ws.lora_offset), free(ws.lora_order), free(ws.lora_t);
}
#else
#define DECODE_ISA "none"

void decode_step(const Model *m, const Rows *r, int threads, float *logits) {
    (void)m, (void)r, (void)threads, (void)logits; /* decode_supported() is 0 */
}
#endif

int decode_supported(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

const char *decode_isa(void) { return DECODE_ISA; }

/* decode.h's layout as this compiler made it, for decode_abi.py's check of its mirror. */
typedef struct {
    const char *name;
    long value;
} Entry;

#define SIZE(T) {"sizeof(" #T ")", (long)sizeof(T)}
#define FIELD(T, f) \
    {"offsetof(" #T ", " #f ")", (long)offsetof(T, f)}, {"sizeof(" #T "." #f ")", (long)sizeof(((T *)0)->f)}
#define CONSTANT(c) {#c, (long)(c)}

static const Entry LAYOUT[] = {
    SIZE(Linear), FIELD(Linear, kind), FIELD(Linear, N), FIELD(Linear, K), FIELD(Linear, G), FIELD(Linear, w),
    FIELD(Linear, scale), FIELD(Linear, zero), FIELD(Linear, bias),

    SIZE(Layer), FIELD(Layer, norm1_w), FIELD(Layer, norm1_b), FIELD(Layer, norm2_w), FIELD(Layer, norm2_b),
    FIELD(Layer, qkv), FIELD(Layer, proj), FIELD(Layer, up), FIELD(Layer, down), FIELD(Layer, k), FIELD(Layer, v),
    FIELD(Layer, q_norm), FIELD(Layer, k_norm), FIELD(Layer, router), FIELD(Layer, experts),
    FIELD(Layer, shared_up), FIELD(Layer, shared_down), FIELD(Layer, shared_gate),
    FIELD(Layer, post_attn_w), FIELD(Layer, post_mlp_w), FIELD(Layer, rope_cos), FIELD(Layer, rope_sin),
    FIELD(Layer, window), FIELD(Layer, lora),

    SIZE(Lora), FIELD(Lora, rank), FIELD(Lora, slices), FIELD(Lora, a), FIELD(Lora, bt), FIELD(Lora, cols),

    SIZE(Model), FIELD(Model, n_layer), FIELD(Model, d_model), FIELD(Model, n_head), FIELD(Model, n_kv),
    FIELD(Model, head_dim), FIELD(Model, ffn), FIELD(Model, vocab), FIELD(Model, capacity),
    FIELD(Model, layernorm), FIELD(Model, swiglu), FIELD(Model, rope), FIELD(Model, gelu_gate), FIELD(Model, n_experts),
    FIELD(Model, top_k), FIELD(Model, norm_topk), FIELD(Model, shared_ffn), FIELD(Model, eps), FIELD(Model, embed_scale),
    FIELD(Model, attn_scale), FIELD(Model, attn_softcap), FIELD(Model, tok_emb),
    FIELD(Model, pos_emb), FIELD(Model, rope_cos), FIELD(Model, rope_sin), FIELD(Model, norm_f_w),
    FIELD(Model, norm_f_b), FIELD(Model, lm_head), FIELD(Model, layers), FIELD(Model, n_adapters),
    FIELD(Model, profile),

    SIZE(Rows), FIELD(Rows, B), FIELD(Rows, token), FIELD(Rows, pos), FIELD(Rows, slot), FIELD(Rows, first),
    FIELD(Rows, row_stride), FIELD(Rows, cache_row), FIELD(Rows, out_row), FIELD(Rows, n_out),
    FIELD(Rows, adapter),

    CONSTANT(F32), CONSTANT(S24), CONSTANT(Q4), CONSTANT(Q8),
    CONSTANT(P_NORM), CONSTANT(P_QKV), CONSTANT(P_ROPE_CACHE), CONSTANT(P_ATTENTION), CONSTANT(P_PROJ),
    CONSTANT(P_UP), CONSTANT(P_ACTIVATION), CONSTANT(P_DOWN), CONSTANT(P_LM_HEAD), CONSTANT(P_ROUTE),
    CONSTANT(P_LORA), CONSTANT(PROFILE_PHASES),
    CONSTANT(LORA_QKV), CONSTANT(LORA_PROJ), CONSTANT(LORA_UP), CONSTANT(LORA_DOWN), CONSTANT(LORA_LINEARS),
};

int decode_layout(char *out, int size) {
    int n = 0;
    for (size_t i = 0; i < sizeof LAYOUT / sizeof *LAYOUT; i++)
        n += snprintf(n < size ? out + n : NULL, n < size ? (size_t)(size - n) : 0, "%s %ld\n", LAYOUT[i].name,
                      LAYOUT[i].value);
    return n;
}
