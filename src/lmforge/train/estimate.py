"""Memory and time planning for a recipe: parameters, memory per rank for each parallel layout,
tokens/s from a short measured probe, and the largest batch that fits a memory budget.

Everything but the probe is arithmetic on the model's shapes (no model is built):

- Parameters: from the layer shapes of `lmforge.model.transformer` (embedding, one block, the
  final norm and an untied `lm_head`).
- Weights, gradients: fp32 (bf16/fp16 autocast keeps fp32 master weights and gradients).
  Optimizer: AdamW's two fp32 moments. DDP adds its gradient buckets (a second copy of the
  gradients); FSDP2 holds a shard of each, plus the gathered embedding/final parameters (the
  root module stays gathered through the step) and one gathered block. The peak comes in the
  loss's backward, before any block is gathered again; blocks are gathered (two at a time, with
  prefetching) later in backward, once most activations are freed.
- Activations: the bytes the autograd graph saves per token, tensor by tensor, for each
  block as `Block.forward` computes it (`block_bytes_per_token`), times the tokens of a
  microbatch; then the final norm and the loss (`loss_bytes`). Attention is SDPA's fused
  path (on CPU `_scaled_dot_product_flash_attention_for_cpu`, on GPUs flash/efficient), which
  keeps no (T x T) scores; only gemma2's soft-capped attention is written out and keeps them.
  Under autocast the matmul inputs are saved in the low precision and the residual stream and
  norms stay fp32 (RMSNorm computes in fp32; the residual add promotes); each linear layer's
  low-precision weight copy is saved too. With activation checkpointing a block keeps only
  its input, and one block's activations are recomputed at a time in backward.
- The peak per rank: weights + optimizer state + layout extras + the larger of (activations
  and the loss's working set, with the gradient of the output layer that backward makes
  first) and (all gradients), since backward frees activations as it makes gradients.

Tensor and pipeline parallelism are estimated the Megatron way: a TP group of t ranks splits
every block's matmul weights and their column-parallel activations (q/k/v, attention output,
MLP intermediates) and the vocabulary (embedding, logits) t ways, while the d_model-sized
activations (residual, norms) are replicated (no sequence parallelism assumed); a pipeline
of p stages holds n_layer/p blocks per rank, the embedding on the first stage and the final
norm and output layer on the last. Under 1F1B the first stage keeps min(p, m) of the m
microbatches in flight and the last stage one (GPipe: all m on each); with more microbatches
than that, a later microbatch's forward comes after the first backward, so every gradient
exists next to the activations in flight (the max above becomes a sum). Each stage keeps one
receive buffer per microbatch (hidden states coming in, their gradients coming back), and
autocast's weight casts are made once per step, not per microbatch. Under fsdp+pp a stage's
parameters stay gathered and its gradients unsharded from the first microbatch to the last
(the pipelining runtime defers FSDP2's resharding and reduce-scatter to the last backward).
"""

from __future__ import annotations

import importlib.util
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from lmforge.config import ModelConfig, Recipe, TrainConfig
from lmforge.errors import LmforgeError

FP32 = 4
ADAM_MOMENTS = 2
LAYOUTS = ("ddp", "fsdp", "tp", "fsdp+tp", "pp", "fsdp+pp")
# the module that makes a layout real; a layout whose module is absent is estimated and marked
LAYOUT_MODULES = {"tp": "lmforge.train.tensor_parallel", "fsdp+tp": "lmforge.train.tensor_parallel",
                  "pp": "lmforge.train.pipeline_parallel", "fsdp+pp": "lmforge.train.pipeline_parallel"}
UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GiB', '512 MiB', '16GB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS or float(m.group(1)) <= 0:
        raise LmforgeError(f"memory budget {text!r} is not a size; write it like 8GiB, 512MiB or 16GB")
    return int(float(m.group(1)) * UNITS[unit])


def gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


# ----------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class Params:
    total: int
    embedding: int  # token (and learned position) embeddings
    per_block: int
    final: int  # the final norm and an untied lm_head
    block_matmul: int  # one block's nn.Linear weights (what autocast copies to low precision)
    block_routed: int  # of per_block, the experts a token does not run (0 for a dense MLP)
    vocab: int


def _norm(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model if cfg.family == "gpt2" else cfg.d_model  # LayerNorm has a bias


def _mlp(cfg: ModelConfig, hidden: int) -> tuple[int, int]:
    """(parameters, matmul weights) of one MLP of `hidden` units."""
    gated = cfg.family != "gpt2"
    weights = cfg.d_model * hidden * (3 if gated else 2)
    bias = ((2 if gated else 1) * hidden + cfg.d_model) if cfg.uses_bias else 0
    return weights + bias, weights


def count_parameters(cfg: ModelConfig, vocab: int) -> Params:
    d, dh, h, kv = cfg.d_model, cfg.dim_head, cfg.n_head, cfg.kv_heads
    qkv = d * (h + 2 * kv) * dh
    attn = qkv + (h + 2 * kv) * dh * cfg.has_qkv_bias + h * dh * d + d * cfg.uses_bias
    attn += 2 * dh if cfg.has_qk_norm else 0
    attn_matmul = qkv + h * dh * d
    if cfg.n_experts:
        expert, expert_matmul = _mlp(cfg, cfg.expert_dim)
        mlp = d * cfg.n_experts + cfg.n_experts * expert
        matmul = d * cfg.n_experts + cfg.n_experts * expert_matmul
        if cfg.moe_shared_d_ff:
            shared, shared_matmul = _mlp(cfg, cfg.moe_shared_d_ff)
            mlp, matmul = mlp + shared + d, matmul + shared_matmul + d
        routed = (cfg.n_experts - cfg.experts_per_token) * expert
    else:
        mlp, matmul = _mlp(cfg, cfg.ffn_dim)
        routed = 0
    norms = (4 if cfg.post_norms else 2) * _norm(cfg)
    per_block = attn + mlp + norms
    embedding = vocab * d + (0 if cfg.uses_rope else cfg.context * d)
    final = _norm(cfg) + (0 if cfg.tie_embeddings else vocab * d)
    return Params(embedding + cfg.n_layer * per_block + final, embedding, per_block, final,
                  attn_matmul + matmul, routed, vocab)


# ----------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class Precision:
    """How a step computes: `act` bytes per matmul input/output (2 under bf16/fp16 autocast)."""
    act: int

    @property
    def autocast(self) -> bool:
        return self.act < FP32


def block_bytes_per_token(cfg: ModelConfig, p: Precision, tp: int = 1) -> float:
    """Bytes one block saves for backward per token (its weight copies aside, `copies_per_block`);
    `tp`: the tensor-parallel degree, which splits the head- and hidden-sized tensors."""
    a, d, dh = p.act, cfg.d_model, cfg.dim_head
    h, kv = cfg.n_head / tp, cfg.kv_heads / tp
    norm_rows = 8 if cfg.family == "gpt2" else 4  # LayerNorm's mean and rstd; RMSNorm's rsqrt
    # norm1, norm2: the fp32 residual input, the normalized fp32 rows (RMSNorm; LayerNorm keeps
    # only its input), and the next matmul's input in the compute dtype
    normalized = 0 if cfg.family == "gpt2" else FP32 * d
    norms = 2 * (FP32 * d + normalized + a * d + norm_rows)
    if cfg.attn_softcap is None:
        # SDPA's fused kernel saves q, k and v (v is a view of the fused projection's output and
        # keeps all of it; q and k are rotated copies), its output (which the projection reads)
        # and the log-sum-exp rows
        attn = a * (h + 2 * kv) * dh + (a * (h + kv) * dh if cfg.uses_rope else 0) + a * h * dh + FP32 * h
    else:
        # written out (soft-capped scores): q, the repeated k and v, the capped scores, the fp32
        # softmax (and its low-precision cast), the output; without repetition v keeps the projection
        T = cfg.context
        attn = (a * (h + 2 * kv) * dh if h == kv else 0) + 4 * a * h * dh
        attn += a * h * T + FP32 * h * T + (a * h * T if p.autocast else 0)
    if cfg.has_qk_norm:  # per head: fp32 normalized rows (+ their low-precision copy), rsqrt
        attn += (FP32 + (a if p.autocast else 0)) * (h + kv) * dh + FP32 * (h + kv)
    if cfg.post_norms:  # an RMSNorm on what attention and the MLP add: their output, fp32 rows, rsqrt
        attn += 2 * (FP32 * d + (a if p.autocast else FP32) * d + 4)
    return norms + attn + mlp_bytes_per_token(cfg, p, tp)


def mlp_bytes_per_token(cfg: ModelConfig, p: Precision, tp: int = 1) -> float:
    a, d = p.act, cfg.d_model
    gated = cfg.family != "gpt2"

    def dense(hidden: float) -> float:  # gated: the fused up output, act(gate), act(gate) * up
        return a * hidden * (4 if gated else 2)

    if not cfg.n_experts:
        return dense(cfg.ffn_dim / tp)
    k, e = cfg.experts_per_token, cfg.n_experts
    # router: its input copy, fp32 softmax, top-k indices and weights; each chosen expert: its
    # gathered input, its MLP, its weighted output
    out = (a if p.autocast else 0) * d + FP32 * e + 12 * k
    out += k * (2 * a * d + dense(cfg.expert_dim / tp))
    if cfg.router_aux_coef > 0:
        out += FP32 * e
    if cfg.moe_shared_d_ff:
        out += dense(cfg.moe_shared_d_ff / tp) + 2 * a * d
    return out


def copies_per_block(params: Params, p: Precision, tp: int = 1) -> float:
    """The low-precision weight copies autocast makes of one block's matmuls (saved for backward)."""
    return p.act * params.block_matmul / tp if p.autocast else 0


@dataclass(frozen=True)
class LossPath:
    """How `language_model_loss` runs: `chunk` rows of logits at a time (the native kernel on
    one CPU process takes them all as one chunk), or in one piece through `F.cross_entropy`."""
    chunk: int  # 0: in one piece
    native: bool


def loss_path(tc: TrainConfig, cfg: ModelConfig, device_type: str, world: int, native_ok: bool) -> LossPath:
    if cfg.logit_softcap is not None:
        return LossPath(0, False)
    native = device_type == "cpu" and native_ok
    if tc.loss_chunk:
        return LossPath(tc.loss_chunk, native)
    if native and world == 1:
        return LossPath(-1, True)  # all the tokens as one chunk
    return LossPath(0, False)


def loss_bytes(cfg: ModelConfig, p: Precision, path: LossPath, tokens: int, vocab: float,
               tp: int = 1) -> tuple[float, float]:
    """(saved at the end of forward, peak working set) of the final norm and the loss, for
    `tokens` tokens; `vocab`: the vocabulary this rank holds."""
    a, d = p.act, cfg.d_model
    final = tokens * (FP32 * d + (0 if cfg.family == "gpt2" else FP32 * d) + 8)
    if path.chunk == 0:
        # lm_head's input and log-softmax's fp32 output are saved; the logits (and their fp32 copy)
        # exist in forward, log-softmax's incoming and outgoing gradients in backward
        saved = tokens * (a * d + FP32 * vocab + (a * vocab if cfg.logit_softcap else 0))
        saved += a * vocab * d if p.autocast else 0  # lm_head's weight copy
        # (vocabulary-parallel under TP: loss_parallel's log-softmax keeps one more shifted copy)
        working = tokens * vocab * (2 + (tp > 1)) * FP32
        return final + saved, working
    chunk = tokens if path.chunk < 0 else min(path.chunk, tokens)
    # the gradients computed in forward: d(hidden) per token, d(lm_head) in fp32; one chunk's
    # logits (an fp32 copy unless the native kernel reads bf16), the weight's copy
    saved = tokens * FP32 * d + FP32 * vocab * d
    copy = FP32 if p.autocast and not path.native else 0
    # under autocast: the weight's cached cast, its explicit copy, one chunk's weight gradient
    working = chunk * vocab * (a + copy) + (3 * a * vocab * d if p.autocast else 0)
    return final + saved, working


# ----------------------------------------------------------------------------- layouts

@dataclass(frozen=True)
class Activations:
    """What one microbatch needs for backward: `held` from its forward until its backward,
    `shared` once however many microbatches are in flight (autocast's weight casts, cached for
    the step), `working` only at its peak (the loss's, or a recomputed block's), and
    `head_grad`, the output layer's gradient that backward makes first."""
    held: float
    shared: float
    working: float
    head_grad: float


@dataclass
class Memory:
    """Bytes per rank."""
    weights: float
    gradients: float
    optimizer: float
    extra: float  # DDP's gradient buckets, FSDP's gathered parameters
    activations: float  # saved for backward + the loss's working set, one microbatch (or what 1F1B holds)
    total: float
    extra_what: str = ""


@dataclass
class LayoutEstimate:
    layout: str
    nproc: int
    wired: bool
    valid: bool
    reason: str = ""  # why the layout cannot run at nproc
    note: str = ""  # what the recipe must change to run it (a batch that does not split evenly)
    sizes: dict[str, int] = field(default_factory=dict)  # dp, tp, pp, microbatches
    rows_per_rank: float = 0  # rows of one microbatch on a rank
    memory: Memory | None = None
    memory_checkpointed: Memory | None = None  # with train.activation_checkpointing
    tokens_per_s: float | None = None
    suggestion: dict[str, Any] | None = None


class Estimator:
    """The arithmetic for one recipe's model and training settings."""

    def __init__(self, recipe: Recipe, vocab: int, device_type: str, dtype: str, native_ok: bool):
        self.recipe, self.cfg, self.tc = recipe, recipe.model, recipe.train
        self.vocab, self.device_type, self.native_ok = vocab, device_type, native_ok
        self.dtype = dtype
        self.precision = Precision(FP32 if dtype == "float32" else 2)
        self.params = count_parameters(self.cfg, vocab)

    # ------------------------------------------------------------------ layout sizes

    def sizes(self, layout: str, nproc: int) -> dict[str, int]:
        tc = self.tc
        tp = (tc.tp_size or (nproc if layout == "tp" else 2)) if layout in ("tp", "fsdp+tp") else 1
        pp = (tc.pp_size or (nproc if layout == "pp" else 2)) if layout in ("pp", "fsdp+pp") else 1
        micro = (tc.pp_microbatches or 2 * pp) if pp > 1 else 1
        return {"dp": max(1, nproc // (tp * pp)), "tp": tp, "pp": pp, "microbatches": micro}

    def check(self, layout: str, nproc: int, s: dict[str, int]) -> str:
        cfg = self.cfg
        if nproc % (s["tp"] * s["pp"]):
            return f"{nproc} process{' is' if nproc == 1 else 'es are'} not a multiple of tp {s['tp']} x pp {s['pp']}"
        if layout in ("fsdp+tp", "fsdp+pp") and s["dp"] < 2:
            return f"needs {2 * s['tp'] * s['pp']}+ processes"
        if s["tp"] > 1 and (cfg.n_head % s["tp"] or cfg.kv_heads % s["tp"]):
            return f"{cfg.n_head} heads / {cfg.kv_heads} kv heads do not split {s['tp']} ways"
        if s["pp"] > cfg.n_layer:
            return f"{s['pp']} stages for {cfg.n_layer} layers"
        return ""

    # ------------------------------------------------------------------ memory

    def activations(self, rows: float, tp: int, blocks: int, checkpointed: bool, loss: bool,
                    world: int) -> Activations:
        """What a microbatch of `rows` rows through `blocks` blocks (with the loss when `loss`) needs."""
        T, p = self.cfg.context, self.precision
        tokens = rows * T
        per_token = block_bytes_per_token(self.cfg, p, tp) * tokens
        copies = copies_per_block(self.params, p, tp)
        saved, working, head_grad = 0.0, 0.0, 0.0
        if loss:
            path = loss_path(self.tc, self.cfg, self.device_type, world, self.native_ok)
            saved, working = loss_bytes(self.cfg, p, path, int(tokens), self.vocab / tp, tp)
            if path.chunk == 0:  # the chunked loss makes it in forward (counted in `saved`)
                head_grad = FP32 * self.vocab * self.cfg.d_model / tp
        ids = tokens * 8
        if checkpointed:
            # each block keeps its input (autocast's weight casts stay cached through forward); the
            # loss's working set is gone by the time backward recomputes one block at a time
            return Activations(blocks * FP32 * self.cfg.d_model * tokens + saved + ids, blocks * copies,
                               max(working, per_token + copies), head_grad)
        return Activations(blocks * per_token + saved + ids, blocks * copies, working, head_grad)

    def hidden_bytes(self, rows: float) -> float:
        """One microbatch's hidden states as they cross between stages (the fp32 residual stream)."""
        return FP32 * self.cfg.d_model * rows * self.cfg.context

    def memory(self, layout: str, nproc: int, s: dict[str, int], rows: float, checkpointed: bool) -> Memory:
        """Memory per rank of `layout` over `nproc` processes, a microbatch of `rows` rows per rank."""
        P, cfg = self.params, self.cfg
        tp, pp, dp, m = s["tp"], s["pp"], s["dp"], s["microbatches"]
        shard = dp if layout.startswith("fsdp") else 1
        blocks = math.ceil(cfg.n_layer / pp)
        world = nproc
        if pp > 1:
            # the busier of the first stage (the embedding, the most microbatches in flight) and the
            # last (the final norm, the output layer and the loss, one microbatch in flight under 1F1B)
            first_p = P.embedding + blocks * P.per_block
            last_p = blocks * P.per_block + P.final + (P.embedding if cfg.tie_embeddings else 0)
            chunks = 2 if self.tc.pp_schedule == "interleaved" else 1
            # receive buffers, one per microbatch, made once: the first stage's for the gradients
            # coming back, the last's for the hidden states coming in (interleaved: both on the
            # process's other stage)
            buffers = m * (2 * chunks - 1) * self.hidden_bytes(rows)
            flight = m if self.tc.pp_schedule == "gpipe" else min(pp, m)
            candidates = [(first_p / tp, self.activations(rows, tp, blocks, checkpointed, False, world), flight),
                          (last_p / tp, self.activations(rows, tp, blocks, checkpointed, True, world),
                           m if self.tc.pp_schedule == "gpipe" else 1)]
        else:
            buffers, m = 0.0, 1
            candidates = [(P.total / tp, self.activations(rows, tp, blocks, checkpointed, True, world), 1)]
        best = None
        for params, act, flight in candidates:
            weights = FP32 * params / shard
            grads, optim = weights, ADAM_MOMENTS * weights
            extra, what = 0.0, ""
            if layout == "ddp" and nproc > 1:
                extra, what = grads, "gradient buckets"
            elif layout == "fsdp+pp":
                # between a stage's microbatches FSDP2 keeps its parameters gathered and accumulates
                # unsharded gradients (reduce-scattered after the last backward); a block's all-gather
                # buffers, its own and the prefetched next one's, come on top
                extra, what = FP32 * (params + 2 * P.per_block / tp), "gathered parameters"
                grads = FP32 * params
            elif shard > 1:
                stage_root = (P.embedding + P.final) / tp if pp == 1 else 0
                block = FP32 * P.per_block / tp
                extra, what = FP32 * stage_root + block, "gathered parameters"
            elif tp > 1 or pp > 1:
                extra, what = grads, "gradient buckets (data parallel)" if dp > 1 else ""
                if dp == 1:
                    extra = 0.0
            if buffers:
                extra, what = extra + buffers, f"{what} + pipeline buffers" if what else "pipeline receive buffers"
            if m > flight:
                # a later microbatch runs forward after the first backward made every gradient
                moving = grads + act.shared + flight * act.held + act.working
            else:
                # the first backward frees what it uses as it makes the gradients
                moving = (flight - 1) * act.held + max(act.shared + act.held + act.working + act.head_grad, grads)
            peak = weights + optim + extra + moving
            mem = Memory(weights, grads, optim, extra, act.shared + flight * act.held + act.working, peak, what)
            if best is None or mem.total > best.total:
                best = mem
        return best

    def estimate(self, layout: str, nproc: int) -> LayoutEstimate:
        s = self.sizes(layout, nproc)
        wired = layout not in LAYOUT_MODULES or importlib.util.find_spec(LAYOUT_MODULES[layout]) is not None
        reason = self.check(layout, nproc, s)
        out = LayoutEstimate(layout, nproc, wired, valid=not reason, reason=reason, sizes=s)
        if reason:
            return out
        unit = s["dp"] * s["microbatches"]
        rows = self.tc.batch_size / unit
        if self.tc.batch_size % unit:
            out.note = f"train.batch_size {self.tc.batch_size} does not split into {unit} equal parts"
        out.rows_per_rank = rows
        out.memory = self.memory(layout, nproc, s, rows, False)
        out.memory_checkpointed = self.memory(layout, nproc, s, rows, True)
        return out

    # ------------------------------------------------------------------ batch suggestion

    def largest_batch(self, layout: str, nproc: int, budget: float, checkpointed: bool) -> int:
        """The largest global train.batch_size whose memory per rank fits `budget` (0: none fits)."""
        s = self.sizes(layout, nproc)
        unit = s["dp"] * s["microbatches"]  # batch_size must split evenly into these
        fits = lambda b: self.memory(layout, nproc, s, b / unit, checkpointed).total <= budget  # noqa: E731
        if not fits(unit):
            return 0
        hi = unit
        while fits(hi * 2) and hi < 2**24:
            hi *= 2
        lo, hi = hi, hi * 2  # fits(lo), not fits(hi)
        while hi - lo > unit:
            mid = (lo + hi) // 2 // unit * unit
            if mid <= lo:
                break
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def suggest(self, layout: str, nproc: int, budget: float) -> dict[str, Any]:
        """train.batch_size (and grad_accum, to keep the recipe's rows per optimizer step) that fit
        `budget`; with activation checkpointing when nothing fits without."""
        tc = self.tc
        target = tc.batch_size * tc.grad_accum
        unit = self.sizes(layout, nproc)["dp"] * self.sizes(layout, nproc)["microbatches"]
        for checkpointed in ((True,) if tc.activation_checkpointing else (False, True)):
            biggest = self.largest_batch(layout, nproc, budget, checkpointed)
            if biggest:
                batch = min(biggest, max(unit, target // unit * unit))
                return {"batch_size": batch, "grad_accum": max(1, math.ceil(target / batch)),
                        "largest_batch_size": biggest, "activation_checkpointing": checkpointed}
        return {"batch_size": 0, "grad_accum": 0, "largest_batch_size": 0,
                "activation_checkpointing": True}


# ----------------------------------------------------------------------------- the probe

def training_step(recipe: Recipe, vocab: int, ctx=None, device=None):
    """One real optimizer step of the recipe's model, as `train.run` takes it, as a function
    (returning the loss): the recipe's batch, precision, loss and activation checkpointing, AdamW,
    the model wrapped as train.parallel says under `ctx` (a `DistContext`; this process's rows of
    the batch). Random token ids: the cost of a step does not depend on the data."""
    import torch

    from lmforge.model import Transformer
    from lmforge.train import distributed
    from lmforge.train.losses import language_model_loss
    from lmforge.train.optim import build_optimizer
    from lmforge.train.precision import autocast_for

    tc, cfg = recipe.train, recipe.model.model_copy(update={"vocab_size": vocab})
    ctx = ctx or distributed.DistContext()
    device = device or distributed.single_device(tc.device)
    torch.manual_seed(tc.seed)
    model = Transformer(cfg).to(device)
    model.train()
    wrapped = distributed.parallelize(model, ctx, device, activation_checkpointing=tc.activation_checkpointing)
    optimizer = build_optimizer(model, tc, device)
    gen = torch.Generator().manual_seed(tc.seed)
    x = torch.randint(0, vocab, (tc.batch_size, cfg.context + 1), generator=gen)[ctx.rows(tc.batch_size)].to(device)

    def step() -> float:
        with autocast_for(device, tc.dtype):
            loss = language_model_loss(wrapped, model.lm_head, x[:, :-1], x[:, 1:], tc.loss_chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    return step


def probe_tokens_per_s(recipe: Recipe, vocab: int, steps: int) -> dict[str, Any]:
    """Training tokens/s of a few real steps (`training_step`) on this machine, one process; one
    more step first, as warm-up, is left out."""
    import torch

    step = training_step(recipe, vocab)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    from lmforge.train.distributed import single_device

    return {"tokens_per_s": recipe.train.batch_size * recipe.model.context / seconds, "steps": steps,
            "seconds_per_step": seconds, "device": str(single_device(recipe.train.device)),
            "threads": torch.get_num_threads()}


def cpu_peak_bytes(run) -> int:
    """The peak of CPU tensor memory while `run()` runs, net of what existed before it: the CPU
    allocator's own running total of live bytes, as torch.profiler records it with profile_memory
    (every tensor, kernels' scratch buffers included; not malloc's overhead or fragmentation)."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    return max((e["args"]["Total Allocated"] for e in events
                if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), default=0)


def scaled_tokens_per_s(one: float, est: LayoutEstimate) -> float:
    """tokens/s of the whole job at `est.nproc`, each process on a device like the probe's:
    linear in the processes (communication not counted), less the pipeline bubble of
    (p - 1) / (m + p - 1) idle stage-steps per step."""
    s = est.sizes
    rate = one * est.nproc
    if s["pp"] > 1:
        rate *= s["microbatches"] / (s["microbatches"] + s["pp"] - 1)
    return rate


# ----------------------------------------------------------------------------- the report

def vocab_of(recipe: Recipe) -> tuple[int, str]:
    """The vocabulary the model will have: model.vocab_size, else the tokenizer the data section trains."""
    if recipe.model.vocab_size is not None:
        return recipe.model.vocab_size, "model.vocab_size"
    return recipe.data.tokenizer.vocab_size, "data.tokenizer.vocab_size (the tokenizer trained for the run)"


def estimate_recipe(recipe: Recipe, nproc: int, layouts: list[str], budget: float | None = None,
                    probe_steps: int = 0) -> dict[str, Any]:
    """The whole report as a dict (what `lmforge estimate --json` prints)."""
    import torch

    from lmforge import native
    from lmforge.train.distributed import single_device
    from lmforge.train.precision import resolve_dtype

    if nproc < 1:
        raise LmforgeError("--nproc must be at least 1")
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown or not layouts:
        raise LmforgeError(f"unknown layout {', '.join(unknown) or '(none)'}: choose from {', '.join(LAYOUTS)}")
    if probe_steps < 0:
        raise LmforgeError("--probe-steps must be >= 0")
    tc = recipe.train
    if tc.device.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError("train.device is cuda but no GPU is visible; use --train.device cpu")
    device = single_device(tc.device)
    dtype = resolve_dtype(device, tc.dtype)
    vocab, vocab_source = vocab_of(recipe)
    est = Estimator(recipe, vocab, device.type, dtype, native.elementwise() is not None)
    if budget is None:
        budget = device_memory(device, nproc)
    P = est.params
    report: dict[str, Any] = {
        "recipe": {"model": recipe.model.model_dump(mode="json", exclude_none=True),
                   "batch_size": tc.batch_size, "grad_accum": tc.grad_accum, "context": recipe.model.context,
                   "activation_checkpointing": tc.activation_checkpointing, "loss_chunk": tc.loss_chunk},
        "vocab": vocab, "vocab_from": vocab_source, "device": str(device), "dtype": dtype,
        "nproc": nproc, "memory_budget": budget,
        "parameters": {"total": P.total, "embedding": P.embedding, "per_block": P.per_block,
                       "blocks": recipe.model.n_layer, "final": P.final,
                       "active_per_token": P.total - recipe.model.n_layer * P.block_routed},
        "layouts": [],
    }
    probe = probe_tokens_per_s(recipe, vocab, probe_steps) if probe_steps else None
    report["probe"] = probe
    report["tokens_per_s_assumption"] = (
        "each process on a device like the probe's: linear in processes, communication not counted; "
        "pipelines lose (p-1)/(m+p-1) to the bubble")
    for layout in layouts:
        e = est.estimate(layout, nproc)
        if e.valid:
            e.suggestion = est.suggest(layout, nproc, budget)
            if probe:
                e.tokens_per_s = scaled_tokens_per_s(probe["tokens_per_s"], e)
        row = asdict(e)
        report["layouts"].append(row)
    return report


def device_memory(device, nproc: int) -> float:
    """Memory one rank may use: the GPU's, or this machine's RAM shared by the processes."""
    import torch

    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return kib * 1024 / nproc
    except (OSError, StopIteration):
        return 8 * 2**30
