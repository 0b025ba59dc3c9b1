/* The interface of decode.c: the structs and constants Python fills in and passes to
 * decode_step. `lmforge/native/decode_abi.py` mirrors them as ctypes structures, and at load
 * time compares that mirror with what decode_layout() reports (every struct's size, every
 * field's offset and size, every constant): where they differ the decoder is not used. A
 * field changed here is changed there too, in the same place.
 */
#ifndef LMFORGE_DECODE_H
#define LMFORGE_DECODE_H

#include <stdint.h>

enum { F32 = 0, S24 = 2, Q4 = 4, Q8 = 8 }; /* Linear.kind: fp32, 2:4 sparse fp32 (sparse.h), or bits per
                                              quantized weight */

typedef struct {
    int kind, N, K, G;   /* G: int4 group size */
    const void *w;       /* fp32 (N, K) | int8 (N, K) | packed int4 (N, K/2) */
    const float *scale;  /* int8: (N,); int4: (N, K/G); 2:4: the dense fp32 (N, K) (sparse.h's batches) */
    const uint8_t *zero; /* int4: (N, K/G); 2:4: the positions (N, ceil(K/8)), w the kept (N, K/2) */
    const float *bias;   /* (N,) or NULL */
} Linear;

/* One LoRA adapter's update of one linear (N, K), for the rows that decode with that adapter:
 * each of its slices s (output rows cols[2s] .. cols[2s] + cols[2s+1] - 1; q, k and v are three
 * slices of the fused qkv) adds (A_s x[b]) @ B_s^T to those rows, the adapter's scaling folded
 * into B. rank 0: the adapter leaves this linear alone. */
typedef struct {
    int rank, slices; /* r, S */
    const float *a;   /* (S * r, K): the slices' A matrices, stacked */
    const float *bt;  /* each slice's B^T (r, its rows) after the other's: the update adds whole rows of it */
    const int *cols;  /* (S, 2): each slice's first output row and row count */
} Lora;

enum { LORA_QKV, LORA_PROJ, LORA_UP, LORA_DOWN, LORA_LINEARS }; /* a layer's linears that adapters update */

typedef struct {
    const float *norm1_w, *norm1_b, *norm2_w, *norm2_b; /* the _b are NULL for RMSNorm */
    Linear qkv, proj, up, down; /* up, down: unused in a mixture-of-experts layer */
    float *k, *v; /* this layer's cache, row 0 of (rows, n_kv, capacity, head_dim) */
    const float *q_norm, *k_norm; /* (head_dim,) RMSNorm weights of each query/key head before RoPE, or NULL */
    Linear router;                /* mixture of experts: (n_experts, d_model) */
    const Linear *experts;        /* n_experts (up, down) pairs, or NULL for a dense MLP */
    Linear shared_up, shared_down, shared_gate; /* a shared expert (w NULL: none) and its (1, d_model) gate */
    const float *post_attn_w, *post_mlp_w; /* gemma2/3: RMSNorm of the attention / MLP output before
                                              it joins the residual, or NULL */
    const float *rope_cos, *rope_sin;      /* this layer's rotary table (gemma3's sliding layers), or NULL */
    int window;                            /* this layer's sliding window, 0: none */
    const Lora *lora;                      /* adapter i's update of linear j at [i * LORA_LINEARS + j]
                                              (Model.n_adapters of them), or NULL */
} Layer;

typedef struct {
    int n_layer, d_model, n_head, n_kv, head_dim, ffn, vocab, capacity;
    int layernorm, swiglu, rope, gelu_gate; /* flags; gelu_gate: the gated MLP's gate is GELU (tanh), GeGLU */
    int n_experts, top_k, norm_topk; /* mixture of experts (n_experts 0: dense); ffn is each expert's */
    int shared_ffn;                  /* the shared expert's hidden size (0: none) */
    float eps;
    float embed_scale, attn_scale, attn_softcap; /* token embeddings times embed_scale; scores q.k times
                                                    attn_scale, then soft-capped where attn_softcap > 0 */
    const float *tok_emb, *pos_emb;   /* (vocab, d), (context, d) or NULL */
    const float *rope_cos, *rope_sin; /* (context, head_dim), angles repeated in both halves */
    const float *norm_f_w, *norm_f_b;
    Linear lm_head;
    const Layer *layers;
    int n_adapters; /* LoRA adapters in each layer's lora table */
    double *profile; /* NULL, or PROFILE_PHASES seconds that each step adds to (thread 0's view) */
} Model;

/* Where a step's time goes, for benchmarks/cpu_decode.py --profile: a phase ends when all
 * its items are done, so its time includes waiting for the last one. */
enum { P_NORM, P_QKV, P_ROPE_CACHE, P_ATTENTION, P_PROJ, P_UP, P_ACTIVATION, P_DOWN, P_LM_HEAD, P_ROUTE, P_LORA, PROFILE_PHASES };

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
    const int *adapter; /* per row: its LoRA adapter (index into the layers' lora tables), -1 none; NULL: none */
} Rows;

/* 1 where this build can decode (AVX2 or better), else 0 and decode_step does nothing. */
int decode_supported(void);

/* The instruction set whose kernels this build decodes with: "avx512-vnni", "avx512",
 * "avx2", or "none". */
const char *decode_isa(void);

/* The layout of the structs and constants above as compiled, one "name value" line each:
 * "sizeof(Linear) 48", "offsetof(Linear, N) 4", "sizeof(Linear.N) 4", "F32 0". Writes at
 * most `size` bytes, NUL included, and returns the length of the whole text. */
int decode_layout(char *out, int size);

/* One step for the B rows described by `r`: logits (n_out or B, vocab). `threads` <= 0:
 * OpenMP's default. */
void decode_step(const Model *m, const Rows *r, int threads, float *logits);

#endif
