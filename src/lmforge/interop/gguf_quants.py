"""GGUF block types that the `gguf` package cannot write, and lmforge's own codes carried over as blocks.

- `from_codes`: an int8 layer (per-channel scale) becomes Q8_0 and a symmetric int4 layer (zero 8,
  groups a multiple of 32) becomes Q4_0 with its codes unchanged: a block of 32 takes its group's
  scale (as fp16, the only rounding) and the same integers, nibbles in the same order
  (byte j = q[j] | q[j + 16] << 4). Nothing is requantized.
- `quantize_q6_k`, `quantize_q4_k`: the k-quants in ggml's block layouts (super-blocks of 256;
  Q6_K: 16 sub-blocks of 16 with int8 scales, 6-bit codes split in low nibbles and high pairs;
  Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes, 4-bit codes).
  Scales are chosen from each sub-block's range (round to nearest), not by ggml's error
  search, so the values are slightly less accurate than llama.cpp's own quantizer at the same size.
- `q4_k_m_type`: which tensors llama.cpp's Q4_K_M mix keeps at Q6_K.

Every function works on whole matrices at once (numpy, no Python loop over blocks).
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------- lmforge codes as blocks

def q8_0_from_codes(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 codes (N, K) with one scale per row -> Q8_0 bytes (N, K / 32 * 34)."""
    n, k = codes.shape
    d = np.repeat(scales.astype(np.float32)[:, None], k // 32, axis=1)[..., None]  # (N, K/32, 1)
    blocks = np.concatenate([_f16_bytes(d), codes.astype(np.int8).reshape(n, k // 32, 32).view(np.uint8)], axis=-1)
    return blocks.reshape(n, -1)


def q4_0_from_codes(packed: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """lmforge's packed symmetric int4 (N, K/2; runs of 32 as 16 bytes) with scales (N, K/group) ->
    Q4_0 bytes (N, K / 32 * 18): the same nibbles, each block with its group's scale."""
    n, half = packed.shape
    blocks = half // 16
    d = np.repeat(scales.astype(np.float32), group_size // 32, axis=1)[..., None]  # (N, K/32, 1)
    out = np.concatenate([_f16_bytes(d), packed.reshape(n, blocks, 16)], axis=-1)
    return out.reshape(n, -1)


# ----------------------------------------------------------------------------- k-quants

def _nearest(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.rint(x), lo, hi).astype(np.int32)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """f32 (N, K), K a multiple of 256 -> Q6_K bytes (N, K / 256 * 210)."""
    n, k = w.shape
    x = w.astype(np.float32).reshape(-1, QK_K)  # one row per super-block
    sub = x.reshape(-1, 16, 16)
    amax = np.abs(sub).max(axis=-1)  # (B, 16)
    sub_scale = amax / 31.0
    d = sub_scale.max(axis=-1) / 127.0  # (B,)
    d = d.astype(np.float16).astype(np.float32)  # what the file holds: codes are chosen against it
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, _nearest(sub_scale / d[:, None], -128, 127), 0)
        step = d[:, None] * sc
        q = np.where(step[..., None] > 0, _nearest(sub / step[..., None], -32, 31), 0) + 32  # (B, 16, 16)
    q = q.reshape(-1, QK_K).astype(np.uint8)
    # element e = h * 128 + s * 64 + p: low nibble in ql[h * 64 + p] (shift 4 s); high pair j = e // 32 % 4
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d[:, None])], axis=-1)
    return blocks.reshape(n, -1)


def _pack_scales_mins(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block -> the 12 bytes of `block_q4_K.scales`."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=-1)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """f32 (N, K), K a multiple of 256 -> Q4_K bytes (N, K / 256 * 144): W = d * sc * q - dmin * m."""
    n, k = w.shape
    sub = w.astype(np.float32).reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)
    hi = np.maximum(sub.max(axis=-1), 0.0)
    sub_scale, sub_min = (hi - lo) / 15.0, -lo  # (B, 8), both >= 0
    d = (sub_scale.max(axis=-1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = (sub_min.max(axis=-1) / 63.0).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, _nearest(sub_scale / d[:, None], 0, 63), 0)
        m = np.where(dmin[:, None] > 0, _nearest(sub_min / dmin[:, None], 0, 63), 0)
        step = (d[:, None] * sc)[..., None]
        offset = (dmin[:, None] * m)[..., None]
        q = np.where(step > 0, _nearest((sub + offset) / step, 0, 15), 0).astype(np.uint8)  # (B, 8, 32)
    # sub-block j = 2 c + s: its element p in the nibble s of qs[c * 32 + p]
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([_f16_bytes(d[:, None]), _f16_bytes(dmin[:, None]), _pack_scales_mins(sc, m), qs], axis=-1)
    return blocks.reshape(n, -1)


def more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down Q4_K_M keeps at Q6_K."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def q4_k_m_type(gguf_name: str, n_layer: int) -> str:
    """'q6_k' or 'q4_k' for one 2-D tensor of a Q4_K_M file."""
    if gguf_name == "output.weight":
        return "q6_k"
    if gguf_name.endswith(("attn_v.weight", "ffn_down.weight")) and gguf_name.startswith("blk."):
        return "q6_k" if more_bits(int(gguf_name.split(".")[1]), n_layer) else "q4_k"
    return "q4_k"
