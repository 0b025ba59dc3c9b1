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
 * a sliding window. Weights are fp32, int8 (per-row scale) or int4 (groups), per layer.
 * The caller owns every buffer: weights and the KV cache are the model's own tensors,
 * shared, never copied. Numerics follow the PyTorch reference (same formulas, fp32).
 */
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
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
    float *k, *v; /* this layer's cache, row 0 of (rows, n_kv, capacity, head_dim) */
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

/* Where a step's time goes, for benchmarks/cpu_decode.py --profile: a phase ends when all
 * its items are done, so its time includes waiting for the last one. */
enum { P_NORM, P_QKV, P_ROPE_CACHE, P_ATTENTION, P_PROJ, P_UP, P_ACTIVATION, P_DOWN, P_LM_HEAD, PROFILE_PHASES };

int decode_supported(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX2__
/* One decoding step's rows: row b feeds token[b] at rotary/learned position pos[b], writes
 * its keys and values to cache slot slot[b] of cache row cache_row[b] (b when NULL), and
 * attends to that cache row's slots first[b]..slot[b] (first > 0: a left-padded prompt in
 * a batch started together). Several rows may share a cache row: a new prompt's tokens fed
 * in the same step as the running batch's. Every row writes its key and value before any
 * row attends (a phase apart), so each of them sees the ones before it. */
typedef struct {
    int B;
    const int *token, *pos, *slot, *first;
    long row_stride; /* floats from one cache row (sequence) to the next */
    const int *cache_row;
    const int *out_row; /* the rows whose logits are wanted, n_out of them (NULL: all B, in order) */
    int n_out;
} Rows;

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
    float *x, *h, *qkv, *att, *up, *act, *scores, *xs, *gsum;
    int8_t *xq;
    int lowbit_tiles; /* int8/int4 matmuls in tiles of four rows (see lowbit_tiles_pay) */
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

#ifdef __AVX512F__
/* [sum a, sum b, sum c, sum d] for four 16-float vectors. */
static inline __m128 hsum4x16(__m512 a, __m512 b, __m512 c, __m512 d) {
#define HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    return hsum4x8(HALVES(a), HALVES(b), HALVES(c), HALVES(d));
#undef HALVES
}

/* Four fp32 weight rows (w) against S <= 4 activation rows (x), over K columns, both with
 * row stride ld: out[4 s + r] = w_r . x_s. Sixteen 16-float accumulators at S = 4 (AVX-512's
 * 32 registers hold them; AVX2's 16 do not, hence its 2 x 4 tile below), one load per two
 * FMAs. The rows of the next tile (4 ld floats on) are fetched while this one computes.
 * On the AMD EPYC we measure on, a 16-float FMA does twice the work of an 8-float one
 * per cycle (237 vs 118 GFLOPS a core): a batch-16 step of the 27M-parameter model took
 * 5.5 ms with this tile against 7.5 ms with the 8-float one. */
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

/* Columns per pass: 16 activation rows of 512 floats (32 KB) stay in the 48 KB L1 while the
 * weight rows stream past. Without it a K = 1408 matmul (the 27M model's down projection)
 * ran at 206 GFLOPS against 248 with it, in a 2-thread micro-benchmark. */
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
#else
/* Two fp32 weight rows against four activation rows (stride K): o0[b] = w0 . x_b and
 * o1[b] = w1 . x_b. Each loaded weight vector serves four FMAs and each activation vector
 * two, so the FMA units rather than the loads set the pace; eight independent
 * accumulators cover the FMA latency. This is what makes a batch of sequences cheaper
 * per token than one: with one row at a time (f32_row) a batch of 16 ran at a quarter
 * of the FMA peak, two loads per FMA. */
static inline void f32_tile2x4(const float *x, int K, const float *w0, const float *w1, float *o0, float *o1) {
    const float *x0 = x, *x1 = x + K, *x2 = x + 2 * (size_t)K, *x3 = x + 3 * (size_t)K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        /* The next pair of rows (2K floats on) is fetched while this one computes: without
         * it the tile waited on memory and streamed weights at a third of B=1's rate. */
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

/* One int8/int4 weight row against the quantized activations of sequence b, scaled. */
static inline float lowbit_row(const Linear *L, const Work *ws, int n, int b) {
    const int K = L->K, blocks = K / QK;
    const int8_t *xq = ws->xq + (size_t)b * K;
    const float *xs = ws->xs + (size_t)b * blocks;
    if (L->kind == Q8) return q8_row(xq, xs, K, (const int8_t *)L->w + (size_t)n * K) * L->scale[n];
    const int groups = K / L->G;
    return q4_row(xq, xs, ws->gsum + (size_t)b * groups, K, (const uint8_t *)L->w + (size_t)n * K / 2,
                  L->scale + (size_t)n * groups, L->zero + (size_t)n * groups, L->G);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LOWBIT_TILE 1
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
                for (int b = 0; b < B; b++) put(L, y, N, b, n, lowbit_row(L, ws, n, b), accumulate);
    }
}
#endif

/* Every thread of the team calls this; the output rows n are shared among them in chunks,
 * and each weight row, once read, serves all B activation rows from the cache. y[b,n] is
 * W[n] . x[b] + bias[n], added to y[b,n] when `accumulate` (a residual connection).
 * Like every phase below, it returns when this thread finds nothing left to do: the step
 * waits for the phase's end (end_phase) after it. */
static void matvec(const Linear *L, const float *x, float *y, int B, int accumulate, Work *ws, Worker *wk) {
    const int N = L->N, K = L->K, groups = L->kind == Q4 ? K / L->G : 0;
    if (L->kind == F32 && B >= 4) {
        matvec_f32_batch(L, x, y, B, accumulate, wk);
        return;
    }
    if (L->kind != F32) { /* int8 activations for the int8/int4 weights, a row per item */
        FOR_ITEMS(wk, b, B) {
            quantize_rows(x + (size_t)b * K, 1, K, ws->xq + (size_t)b * K, ws->xs + (size_t)b * (K / QK));
            if (L->kind == Q4)
                group_sums(ws->xq + (size_t)b * K, ws->xs + (size_t)b * (K / QK), K, L->G, ws->gsum + (size_t)b * groups);
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
                                                  : lowbit_row(L, ws, n, b), accumulate);
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

/* Attention of each row's new query, per head, over its cached slots (team-shared). */
static void attend(const Model *m, const Layer *L, const Rows *r, Work *ws, Worker *wk) {
    const int hd = m->head_dim, group = m->n_head / m->n_kv, cap = m->capacity, width = (m->n_head + 2 * m->n_kv) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t row_bytes = sizeof(float) * hd;
    FOR_ITEMS(wk, bh, r->B * m->n_head) {
        const int b = bh / m->n_head, h = bh % m->n_head, end = r->slot[b];
        int lo = r->first[b];
        if (m->window > 0 && end - m->window + 1 > lo) lo = end - m->window + 1;
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
static void mlp_activation(const Model *m, Work *ws, int B, Worker *wk) {
    const int f = m->ffn, stride = (m->swiglu ? 2 : 1) * f, runs = (f + 511) / 512;
    const __m256 one = _mm256_set1_ps(1.0f);
    FOR_ITEMS(wk, t, B * runs) {
        const int b = t / runs, lo = (t % runs) * 512, hi = lo + 512 < f ? lo + 512 : f;
        const float *row = ws->up + (size_t)b * stride;
        float *out = ws->act + (size_t)b * f;
        int i = lo;
        for (; i + 8 <= hi; i += 8) {
            const __m256 x = _mm256_loadu_ps(row + i);
            if (m->swiglu) {
                const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
                _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(row + f + i)));
            } else {
                _mm256_storeu_ps(out + i, _mm256_mul_ps(x, gelu_sigmoid(x)));
            }
        }
        for (; i < hi; i++)
            out[i] = m->swiglu ? row[i] / (1.0f + expf(-row[i])) * row[f + i] : row[i] * gelu_sigmoid1(row[i]);
    }
}

/* Rotary embedding of each row's query and key heads, and its key/value into its cache row. */
static void rope_and_cache(const Model *m, const Layer *L, const Rows *r, Work *ws, Worker *wk) {
    const int hd = m->head_dim, nq = m->n_head * hd, nkv = m->n_kv * hd, width = nq + 2 * nkv;
    FOR_ITEMS(wk, b, r->B) {
        float *q = ws->qkv + (size_t)b * width, *k = q + nq, *v = q + nq + nkv;
        if (m->rope) {
            const float *cos = m->rope_cos + (size_t)r->pos[b] * hd, *sin = m->rope_sin + (size_t)r->pos[b] * hd;
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

static size_t lowbit_bytes(const Linear *L) { return L->kind == F32 ? 0 : (size_t)L->N * L->K * L->kind / 8; }

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

/* Whether the int8/int4 matmuls take the four-row tiles. A batch does: each weight row then
 * serves several sequences. At batch 1 the tile's 512-bit products beat the row kernel
 * (lowbit_row) while the quantized weights stay in the last-level cache, where a small model's
 * row-kernel int4 step was slower than its fp32 one; once they stream from memory the row
 * kernel's one sequential stream reads faster (benchmarks/quant_decode_sizes.py). */
static int lowbit_tiles_pay(const Model *m, int B) {
    static long cache = 0; /* the same for every caller: a racing first write is harmless */
    if (B >= 4) return 1;
    if (cache == 0) cache = cache_bytes();
    size_t total = lowbit_bytes(&m->lm_head);
    for (int l = 0; l < m->n_layer; l++) {
        const Layer *L = &m->layers[l];
        total += lowbit_bytes(&L->qkv) + lowbit_bytes(&L->proj) + lowbit_bytes(&L->up) + lowbit_bytes(&L->down);
    }
    return total <= (size_t)cache;
}

/* One step for the B rows described by `r`: logits (B, vocab). `threads` <= 0: OpenMP's default. */
void decode_step(const Model *m, const Rows *r, int threads, float *logits) {
    const int d = m->d_model, hd = m->head_dim, B = r->B;
    const int width = (m->n_head + 2 * m->n_kv) * hd, up_width = (m->swiglu ? 2 : 1) * m->ffn;
    const int widest = max_int(max_int(d, m->ffn), m->n_head * hd);
    Work ws;
    ws.x = malloc(sizeof(float) * B * d);
    ws.h = malloc(sizeof(float) * B * d);
    ws.qkv = malloc(sizeof(float) * B * width);
    ws.att = malloc(sizeof(float) * B * m->n_head * hd);
    ws.up = malloc(sizeof(float) * B * up_width);
    ws.act = malloc(sizeof(float) * B * m->ffn);
    ws.scores = malloc(sizeof(float) * (size_t)B * m->n_head * m->capacity);
    ws.xq = malloc((size_t)B * widest + QK);
    ws.xs = malloc(sizeof(float) * B * (widest / QK + 1));
    ws.gsum = malloc(sizeof(float) * B * (widest / QK + 1));
    ws.lowbit_tiles = lowbit_tiles_pay(m, B);
    const int team_size = threads > 0 ? threads : omp_get_max_threads();
    const int phases = 13 * m->n_layer + 4; /* at most: every matmul quantized, some logits rows wanted */
    Team team = {aligned_alloc(64, sizeof(Line) * phases * team_size), aligned_alloc(64, sizeof(Line) * team_size),
                 team_size, phases};
    memset(team.taken, 0, sizeof(Line) * (size_t)phases * team_size);
    memset(team.done, 0, sizeof(Line) * team_size);

    for (int b = 0; b < B; b++)
        for (int i = 0; i < d; i++)
            ws.x[(size_t)b * d + i] = m->tok_emb[(size_t)r->token[b] * d + i] +
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
            rope_and_cache(m, L, r, &ws, &wk);
            SYNC(P_ROPE_CACHE)
            attend(m, L, r, &ws, &wk);
            SYNC(P_ATTENTION)
            matvec(&L->proj, ws.att, ws.x, B, 1, &ws, &wk);
            SYNC(P_PROJ)
            norm_rows(m, ws.x, L->norm2_w, L->norm2_b, ws.h, B, &wk);
            SYNC(P_NORM)
            matvec(&L->up, ws.h, ws.up, B, 0, &ws, &wk);
            SYNC(P_UP)
            mlp_activation(m, &ws, B, &wk);
            SYNC(P_ACTIVATION)
            matvec(&L->down, ws.act, ws.x, B, 1, &ws, &wk);
            SYNC(P_DOWN)
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
    free(ws.xq), free(ws.xs), free(ws.gsum), free(team.taken), free(team.done);
}
#else
void decode_step(const void *m, const void *r, int threads, float *logits) {
    (void)m, (void)r, (void)threads, (void)logits; /* decode_supported() is 0 */
}
#endif
