"""The one decoder-only Transformer, configured per family (see `ModelConfig`).

- gpt2: learned absolute positions, LayerNorm, GELU (tanh) MLP, biases everywhere, tied embeddings.
- llama: rotary positions (with Llama-3 or YaRN frequency scaling), RMSNorm, SwiGLU MLP,
  grouped-query attention, no biases; qwen2 adds q/k/v biases, mistral a sliding window,
  qwen3 an RMSNorm on each query and key head before RoPE.
- mixtral, qwen3_moe, qwen2_moe: mistral, qwen3 and qwen2 with a mixture-of-experts MLP
  (`model.moe`; qwen2_moe's has a shared expert too).
- gemma: llama with embeddings scaled by sqrt(d_model) and a GeGLU MLP; gemma2/gemma3 add
  RMSNorms on the attention and MLP outputs, soft-capped scores and logits, per-layer sliding
  windows (and, gemma3, q/k norms and a rope base of their own for the sliding layers).

Attention is `F.scaled_dot_product_attention`. The query/key/value projections are one
fused matmul, and so are the SwiGLU gate and up projections: at batch 1 decoding reads
every weight once per token, and one large matmul reads them faster than three small
ones. The Hugging Face names and layouts live in `lmforge.interop.hf`, not here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import fused
from lmforge.model.activations import gelu_tanh
from lmforge.model.kv_cache import KVCache
from lmforge.model.moe import MoE


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with linear, Llama-3 or YaRN scaling when configured."""
    d = cfg.dim_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.float()
    if s.rope_type == "yarn":
        return yarn_frequencies(inv_freq, cfg).float()
    if s.rope_type == "linear":
        return (inv_freq / s.factor).float()
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled).float()


def yarn_frequencies(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """YaRN: dimensions that turn fewer than `beta_slow` times over the original context are
    interpolated (divided by `factor`), those that turn more than `beta_fast` times are kept,
    and a linear ramp blends the ones between."""
    s, d = cfg.rope_scaling, cfg.dim_head

    def dimension(rotations: float) -> float:  # the dimension that turns `rotations` times
        turns = s.original_max_position_embeddings / (rotations * 2 * math.pi)
        return d * math.log(turns) / (2 * math.log(cfg.rope_theta))

    low, high = dimension(s.beta_fast), dimension(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What YaRN multiplies cos and sin by (so q.k by its square); 1 otherwise."""
    s = cfg.rope_scaling
    if s is None or s.rope_type != "yarn":
        return 1.0
    if s.attention_factor is not None:
        return s.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    return mscale(s.factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): values kept within (-cap, cap), smoothly (gemma2/3)."""
    return x if cap is None else torch.tanh(x / cap) * cap


def eager_attention(q, k, v, mask, is_causal: bool, scale: float, softcap: float | None, dropout: float):
    """Attention written out, for what SDPA cannot do: soft-capping the scores before the softmax."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = soft_cap((q @ k.transpose(-1, -2)) * scale, softcap)  # (B, h, T, S)
    if is_causal:  # as SDPA's is_causal: query i sees keys 0..i
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = F.dropout(scores.float().softmax(-1).to(q.dtype), dropout)
    return p @ v


def last_query_mask(mask, is_causal: bool) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for the last of a chunk's queries alone: the last row of a dense mask;
    under a causal shape (`is_causal`, a `fused.CausalAfter`) it sees every key, so no mask."""
    if isinstance(mask, torch.Tensor):
        return mask[..., -1:, :], False
    return None, False


def segment_attention(segment_ids: torch.Tensor, causal: bool,
                      sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) restarting at each segment, and the boolean attention mask (B, 1, T, T)
    that keeps every token inside its segment (and causal, and within the window, if so)."""
    B, T = segment_ids.shape
    i = torch.arange(T, device=segment_ids.device)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    positions = i - torch.where(starts, i, 0).cummax(dim=1).values  # (B, T)
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T): query row, key column
    if causal:
        mask &= i[None, :] <= i[:, None]
    if sliding_window is not None:
        mask &= i[None, :] > i[:, None] - sliding_window
    return positions, mask[:, None]


class RMSNorm(nn.Module):
    """Normalizes in fp32 whatever the activation dtype, as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(x, self.weight):
            return fused.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "gpt2":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


def add_and_norm(norm: nn.Module, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, norm(x + a)): one pass for an RMSNorm where the fused kernels apply."""
    if isinstance(norm, RMSNorm) and fused.enabled(x, a, norm.weight) and x.shape == a.shape:
        return fused.add_rms_norm(x, a, norm.weight, norm.eps)
    x = x + a
    return x, norm(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.d = cfg.n_head, cfg.kv_heads, cfg.dim_head
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv) * self.d, bias=cfg.has_qkv_bias)
        self.proj = nn.Linear(self.n_head * self.d, cfg.d_model, bias=cfg.uses_bias)
        self.dropout = cfg.dropout
        self.scale = cfg.attn_scale if cfg.query_pre_attn_scalar is not None else None  # None: SDPA's 1/sqrt(d)
        self.softcap = cfg.attn_softcap
        # qwen3, gemma3: each query and key head normalized (one weight per head dimension) before RoPE
        self.q_norm = RMSNorm(self.d, cfg.norm_eps) if cfg.has_qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.norm_eps) if cfg.has_qk_norm else None

    def forward(self, x, rope, cache: KVCache | None, layer: int, mask, is_causal: bool, last_only: bool = False):
        """Every token's keys and values go to `cache`; with `last_only` only the last token's
        output (B, 1, d_model) is computed."""
        B, T, _ = x.shape
        qkv = fused.linear(self.qkv, x)
        if rope is not None and self.q_norm is None and fused.rope_applies(qkv, rope):
            fused.rope_(qkv, self.n_head + self.n_kv, self.d, rope)  # queries and keys, in place
            rope = None
        q, k, v = qkv.split([self.n_head * self.d, self.n_kv * self.d, self.n_kv * self.d], dim=-1)
        q, k = q.view(B, T, self.n_head, self.d), k.view(B, T, self.n_kv, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, h, T, d), (B, kv, T, d)
        v = v.view(B, T, self.n_kv, self.d).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if last_only and T > 1:
            q, T = q[:, :, -1:], 1
            mask, is_causal = last_query_mask(mask, is_causal)
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, fused.CausalAfter) and self.softcap is not None:
            mask = mask.dense(T, x.device)
        if self.softcap is not None:
            y = eager_attention(q, k, v, mask, is_causal, self.scale or self.d ** -0.5, self.softcap, dropout)
        else:
            y = fused.attention(q, k, v, mask, is_causal, dropout, self.n_kv != self.n_head, self.scale)
        return fused.linear(self.proj, y.transpose(1, 2).reshape(B, T, self.n_head * self.d))


class MLP(nn.Module):
    """gpt2: fc -> GELU(tanh) -> proj.  llama family: SwiGLU with gate and up fused;
    gemma family: the same with a GELU(tanh) gate (GeGLU)."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        self.swiglu = cfg.family != "gpt2"  # gated: SwiGLU, or GeGLU (gemma)
        self.gate_act = gelu_tanh if cfg.is_gemma else F.silu
        self.hidden = hidden or cfg.ffn_dim
        self.up = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * self.hidden, bias=cfg.uses_bias)
        self.down = nn.Linear(self.hidden, cfg.d_model, bias=cfg.uses_bias)

    def forward(self, x):
        h = fused.linear(self.up, x)
        if self.swiglu and self.gate_act is F.silu and fused.enabled(h):
            h = fused.silu_mul(h, self.hidden)
        elif self.swiglu:
            gate, up = h.split(self.hidden, dim=-1)
            h = self.gate_act(gate) * up
        else:
            h = gelu_tanh(h)
        return fused.linear(self.down, h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MoE(cfg, lambda hidden: MLP(cfg, hidden)) if cfg.n_experts else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        # gemma2/3 normalize what attention and the MLP add to the residual stream too.
        self.post_attn_norm = make_norm(cfg) if cfg.post_norms else nn.Identity()
        self.post_mlp_norm = make_norm(cfg) if cfg.post_norms else nn.Identity()

    def forward(self, x, rope, cache, layer, mask, is_causal, last_only: bool = False):
        """The block's output (B, T, d_model); (B, 1, d_model), the last token's, with `last_only`
        (every token's keys and values still go to `cache`)."""
        a = self.attn(self.norm1(x), rope, cache, layer, mask, is_causal, last_only=last_only)
        if last_only:
            x = x[:, -1:]
        x, h = add_and_norm(self.norm2, x, self.drop(self.post_attn_norm(a)))
        return x + self.drop(self.post_mlp_norm(self.mlp(h)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = None if cfg.uses_rope else nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Losses that apply lm_head themselves, chunk by chunk, read this to leave such models alone.
        self.lm_head.soft_cap = cfg.logit_softcap
        self.init_rope()
        self.reset_parameters()

    def init_rope(self) -> None:
        """(Re)compute the rotary tables; also after weights were loaded onto a meta-built model."""
        cfg = self.config
        if not cfg.uses_rope:
            return
        device = self.tok_emb.weight.device
        if device.type == "meta":
            device = None
        tables = {"rope": cfg}
        if cfg.rope_local_theta is not None:  # gemma3's sliding layers: a base of their own, unscaled
            tables["rope_local"] = cfg.model_copy(update={"rope_theta": cfg.rope_local_theta, "rope_scaling": None})
        for prefix, table_cfg in tables.items():
            # Angles for every position up to the context, in fp32; cos/sin are taken per step.
            angles = torch.outer(torch.arange(cfg.context, dtype=torch.float32, device=device),
                                 rope_frequencies(table_cfg).to(device))
            angles = torch.cat((angles, angles), dim=-1)  # (context, head_dim)
            scale = rope_attention_factor(table_cfg)
            self.register_buffer(f"{prefix}_cos", angles.cos() * scale, persistent=False)
            self.register_buffer(f"{prefix}_sin", angles.sin() * scale, persistent=False)

    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2 style init; residual projections scaled by 1/sqrt(2 * n_layer)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                s = std / math.sqrt(2 * self.config.n_layer) if name.endswith(("proj.weight", "down.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def _rope(self, positions: torch.Tensor | None, T: int, dtype: torch.dtype, local: bool = False):
        """cos and sin for the next T tokens; `local`: the sliding layers' own table (gemma3)."""
        if not self.config.uses_rope:
            return None
        cos, sin = (self.rope_local_cos, self.rope_local_sin) if local else (self.rope_cos, self.rope_sin)
        if positions is None:
            cos, sin = cos[:T], sin[:T]  # (T, d), broadcast over (B, h)
        else:
            cos, sin = cos[positions][:, None], sin[positions][:, None]  # (B, 1, T, d)
        return cos.to(dtype), sin.to(dtype)

    def layer_inputs(self, layer: int, T: int, dtype: torch.dtype, device) -> tuple:
        """(rope, mask, is_causal) that block `layer` gets for T tokens from position 0 without a
        cache: what replaying one block at a time (GPTQ's calibration) passes it."""
        cfg = self.config
        local = cfg.rope_local_theta is not None and cfg.layer_window(layer) is not None
        return self._rope(None, T, dtype, local), *self._attention_mask(cfg.layer_window(layer), T, device, None, None)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The input to the first block (B, T, d_model): token (and learned position) embeddings."""
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.config.is_gemma:  # the scale in the weights' dtype, as Gemma rounds it (bf16: 55.5, not 55.43)
            x = x * torch.tensor(self.config.d_model ** 0.5, dtype=x.dtype)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions if positions is not None else
                                 torch.arange(input_ids.shape[1], device=input_ids.device))
        return x

    def _attention_mask(self, window: int | None, T: int, device, kv_cache: KVCache | None,
                        segment_ids: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for the layers with sliding `window` (None: every earlier token)."""
        cfg = self.config
        if kv_cache is not None:
            mask = kv_cache.attention_mask(T, window)
            # Without a mask, SDPA's is_causal aligns queries to the first keys, which is only
            # right when nothing is cached yet; a single new token may see every slot.
            is_causal = mask is None and kv_cache.length == 0 and T > 1
            return fused.causal_after(mask, T) or mask, is_causal
        if segment_ids is not None:
            return segment_attention(segment_ids, cfg.causal, window)[1], False
        if window is not None and T > window:
            i = torch.arange(T, device=device)
            return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window), False
        return None, cfg.causal

    def hidden_states(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None,
                      pad_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                      last_only: bool = False) -> torch.Tensor:
        """Final normalized hidden states (B, T, d_model); task heads read these. `last_only`:
        the last position's (B, 1, d_model), the last block run for it alone after writing every
        token's keys and values (a prompt's other positions feed nothing after that block).

        `segment_ids` (B, T): tokens attend only within their own segment, and positions restart
        at each segment (packed sequences; padding as a segment of its own)."""
        cfg = self.config
        B, T = input_ids.shape
        if kv_cache is None:
            if T > cfg.context:
                raise ValueError(f"sequence of {T} tokens is longer than the model's context of {cfg.context}")
            if pad_mask is not None:
                raise ValueError("pad_mask needs a kv_cache (padding is only for batched generation)")
            positions = None if segment_ids is None else segment_attention(segment_ids, cfg.causal)[0]
        elif not cfg.causal:
            raise ValueError("a bidirectional encoder (causal: false) does not decode with a KV cache")
        else:
            positions = kv_cache.positions(pad_mask, T)
        windows = [cfg.layer_window(i) for i in range(cfg.n_layer)]
        masks = {w: self._attention_mask(w, T, input_ids.device, kv_cache, segment_ids) for w in set(windows)}
        x = self.drop(self.embed(input_ids, positions))
        ropes = {local: self._rope(positions, T, x.dtype, local) for local in {False, cfg.rope_local_theta is not None}}
        for i, block in enumerate(self.blocks):
            local = cfg.rope_local_theta is not None and windows[i] is not None
            x = block(x, ropes[local], kv_cache, i, *masks[windows[i]], last_only=last_only and i == cfg.n_layer - 1)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm_f(x)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None,
                pad_mask: torch.Tensor | None = None, last_only: bool = False,
                segment_ids: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab); (B, 1, vocab) with `last_only` (what decoding needs).
        `return_hidden`: the final hidden states (B, T, d_model) instead, through whatever wraps
        the model (DDP, FSDP), for a loss that applies `lm_head` itself, chunk by chunk."""
        if return_hidden:
            return self.hidden_states(input_ids, kv_cache, pad_mask, segment_ids)
        h = self.hidden_states(input_ids, kv_cache, pad_mask, segment_ids, last_only)
        return soft_cap(fused.linear(self.lm_head, h), self.config.logit_softcap)

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        cfg = self.config
        p = self.tok_emb.weight  # not lm_head: a quantized one would dequantize to answer
        return KVCache(cfg.n_layer, batch, cfg.kv_heads, cfg.dim_head, capacity or cfg.context, p.dtype, p.device)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight (lm_head included) plus attention's
        QK^T and AV over `seq_len` keys; training is 3x the forward pass."""
        cfg = self.config
        T = seq_len or cfg.context
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        for moe in (m for m in self.modules() if isinstance(m, MoE)):  # a token runs only its chosen experts
            expert = sum(p.numel() for p in moe.experts[0].parameters() if p.dim() == 2)
            matmul_weights -= (moe.n_experts - moe.top_k) * expert
        attention = 2 * 2 * cfg.n_layer * T * cfg.n_head * cfg.dim_head
        forward = 2 * matmul_weights + attention
        return 3 * forward if training else forward
