"""`lmforge distill`: train a smaller student on a teacher's logits and hidden states.

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, data)
       + beta * hidden-state loss

where `_T` is a softmax at temperature T (Hinton et al., 2015; the T^2 keeps the gradient
scale independent of T). The hidden-state term (TinyBERT-style feature distillation) asks
each student block's output to match the output of an evenly spaced teacher block (the last
to the last): the mean squared difference of the two after a parameter-free layer norm,
through a learned linear map when the widths differ (trained alongside, then dropped). It
gives every layer a target instead of only the last, which is what lets a short run close
most of the gap (benchmarks/distill_gap.py; RESULTS.md).

With `top_k`, the teacher is summarized by its k largest logits per position plus the
probability of all the others (one "rest" bucket, so that the target is still a
distribution over the whole vocabulary and the student is scored over the same k + 1
outcomes), and those are cached per batch with the matched hidden states, so a run that
revisits batches (steps > pool) calls the teacher once per distinct batch.

The student is a model directory (its weights are the starting point) or a recipe (a new
model of that shape, e.g. half the teacher's layers); it must share the teacher's
tokenizer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer


@dataclass
class DistillConfig:
    steps: int = 200
    batch_size: int = 16
    seq_len: int | None = None  # default: the student's context
    lr: float = 3e-3
    temperature: float = 2.0
    alpha: float = 0.9  # weight of the KL term; 1 - alpha goes to cross-entropy
    top_k: int = 0  # 0: full teacher distribution
    pool: int = 0  # distinct batches, revisited in turn (0: as many as steps)
    hidden_weight: float = 3.0  # beta: weight of the hidden-state term (0: logits only)
    seed: int = 0

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise LmforgeError("--steps and --batch-size must be positive")
        if self.temperature <= 0:
            raise LmforgeError("--temperature must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise LmforgeError("--alpha must be in [0, 1]")
        if self.top_k < 0:
            raise LmforgeError("--top-k must be >= 0")
        if self.hidden_weight < 0:
            raise LmforgeError("--hidden-weight must be >= 0")


@dataclass
class DistillResult:
    losses: list[float] = field(default_factory=list)
    val_before: float | None = None
    val_after: float | None = None
    seconds: float = 0.0


@dataclass
class TeacherTargets:
    """What the student learns from on one batch: the teacher's logits (all of them, or the
    top k with their token ids and the log-sum-exp at the distillation temperature, from
    which the rest bucket's probability follows) and the matched blocks' outputs."""

    logits: torch.Tensor
    index: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    hidden: list[torch.Tensor] = field(default_factory=list)


def summarize_teacher(logits: torch.Tensor, temperature: float, top_k: int,
                      hidden: list[torch.Tensor] | None = None) -> TeacherTargets:
    hidden = hidden or []
    if not top_k or top_k >= logits.shape[-1]:
        return TeacherTargets(logits, hidden=hidden)
    values, index = logits.topk(top_k, dim=-1)
    return TeacherTargets(values, index, torch.logsumexp(logits.float() / temperature, dim=-1), hidden)


def _rest(log_p_top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(log_p_top))) per row: the log-probability of everything outside the top k."""
    return torch.log1p(-log_p_top.exp().sum(-1).clamp(max=1 - 1e-6))


def distill_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherTargets,
                 temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL + (1 - alpha) * CE against the teacher's targets (`summarize_teacher`)."""
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).float()
    ce = F.cross_entropy(s, targets.reshape(-1))
    t = teacher.logits.reshape(-1, teacher.logits.shape[-1]).float() / temperature
    log_s = F.log_softmax(s / temperature, dim=-1)
    if teacher.index is None:
        log_t = F.log_softmax(t, dim=-1)
    else:
        # k + 1 outcomes: the teacher's top k tokens and "any other token", for both models.
        log_t = t - teacher.lse.reshape(-1, 1).float()
        log_s = log_s.gather(1, teacher.index.reshape(-1, teacher.index.shape[-1]))
        log_t = torch.cat([log_t, _rest(log_t)[:, None]], dim=1)
        log_s = torch.cat([log_s, _rest(log_s)[:, None]], dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def matched_layers(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher block whose output each student block imitates: evenly spaced, last to last."""
    return [round((j + 1) * teacher_layers / student_layers) - 1 for j in range(student_layers)]


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], maps: nn.ModuleList | None) -> torch.Tensor:
    """Mean over matched blocks of the squared difference of layer-normed outputs."""
    total = 0.0
    for j, (h_s, h_t) in enumerate(zip(student, teacher)):
        if maps is not None:
            h_s = maps[j](h_s)
        total = total + F.mse_loss(F.layer_norm(h_s, h_s.shape[-1:]), F.layer_norm(h_t.float(), h_t.shape[-1:]))
    return total / max(1, len(student))


class BlockOutputs:
    """Records the outputs of some blocks of a model on each forward (forward hooks)."""

    def __init__(self, model: Transformer, layers: list[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        self.layers = layers
        self._hooks = [model.blocks[i].register_forward_hook(self._keep(i)) for i in sorted(set(layers))]

    def _keep(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = output
        return hook

    def take(self) -> list[torch.Tensor]:
        out = [self.outputs[i] for i in self.layers]
        self.outputs = {}
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def distill(teacher: Transformer, student: Transformer, data_dir: Path, cfg: DistillConfig, log=lambda s: None) -> DistillResult:
    from lmforge.data.loader import BatchLoader, TokenSplit
    from lmforge.eval.perplexity import evaluate_split

    if teacher.config.vocab != student.config.vocab:
        raise LmforgeError(f"teacher and student vocabularies differ ({teacher.config.vocab} vs {student.config.vocab}): "
                           "they must share a tokenizer")
    split = TokenSplit(data_dir, "train")
    if split.vocab_size > student.config.vocab:
        raise LmforgeError(f"{data_dir} was tokenized with a larger vocabulary than the models have")
    T = min(cfg.seq_len or student.config.context, student.config.context, teacher.config.context)
    loader = BatchLoader(split, cfg.batch_size, T, cfg.seed)
    val = TokenSplit(data_dir, "val")
    result = DistillResult(val_before=evaluate_split(student, val, max_batches=8).perplexity)
    teacher.eval()
    student.train()
    params = list(student.parameters())
    maps = None
    use_hidden = cfg.hidden_weight > 0
    if use_hidden:
        s_hooks = BlockOutputs(student, list(range(student.config.n_layer)))
        t_hooks = BlockOutputs(teacher, matched_layers(student.config.n_layer, teacher.config.n_layer))
        if student.config.d_model != teacher.config.d_model:
            with torch.random.fork_rng():  # seeded, without moving the caller's random state
                torch.manual_seed(cfg.seed)
                maps = nn.ModuleList(nn.Linear(student.config.d_model, teacher.config.d_model, bias=False)
                                     for _ in range(student.config.n_layer))
            params += list(maps.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, cfg.steps // 20)
    cache: dict[int, TeacherTargets] = {}
    start = time.perf_counter()
    try:
        for step in range(cfg.steps):
            index = step % cfg.pool if cfg.pool else step
            x, y = loader.batch(index)
            if index in cache:
                t = cache[index]
            else:
                with torch.no_grad():
                    logits = teacher(x)
                    t = summarize_teacher(logits, cfg.temperature, cfg.top_k, t_hooks.take() if use_hidden else None)
                if cfg.top_k:
                    cache[index] = t
            lr = cfg.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = distill_loss(student(x), y, t, cfg.temperature, cfg.alpha)
            if use_hidden:
                loss = loss + cfg.hidden_weight * hidden_loss(s_hooks.take(), t.hidden, maps)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            result.losses.append(loss.item())
            if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
                log(f"step {step + 1}/{cfg.steps}: loss {loss.item():.4f}")
    finally:
        if use_hidden:
            s_hooks.close()
            t_hooks.close()
    student.eval()
    result.seconds = time.perf_counter() - start
    result.val_after = evaluate_split(student, val, max_batches=8).perplexity
    return result


def build_student(spec: str, teacher_vocab: int, seed: int = 0):
    """(model, tokenizer or None): a model directory, or a recipe name/file for a fresh model
    (initialized from `seed`)."""
    import lmforge

    if Path(spec).is_dir():
        m = lmforge.load(spec)
        return m.model, m.tokenizer
    from lmforge.config import load_recipe

    recipe = load_recipe(spec, [])
    recipe.model.vocab_size = teacher_vocab
    torch.manual_seed(seed)
    return Transformer(recipe.model), None


def run_distill(teacher_dir, student_spec: str, data_dir, out, cfg: DistillConfig, log=print) -> dict[str, Any]:
    import lmforge
    from lmforge.compress.storage import is_quantized_dir
    from lmforge.model_dir import save_model_dir

    if is_quantized_dir(teacher_dir) is not None:
        log("note: the teacher is quantized; its logits are the quantized model's")
    if not Path(data_dir).is_dir():
        raise LmforgeError(f"--data must be a prepared data directory (`lmforge data prepare`), not {data_dir}")
    teacher = lmforge.load(teacher_dir)
    student, tokenizer = build_student(student_spec, teacher.config.vocab, cfg.seed)
    result = distill(teacher.model, student, Path(data_dir), cfg, log)
    record = {"teacher": str(teacher_dir), "student": student_spec, "steps": cfg.steps, "temperature": cfg.temperature,
              "alpha": cfg.alpha, "top_k": cfg.top_k, "hidden_weight": cfg.hidden_weight, "val_perplexity_before": result.val_before,
              "val_perplexity_after": result.val_after}
    save_model_dir(student, tokenizer or teacher.tokenizer, out, {"parents": [str(teacher_dir)], "distillation": record})
    return {**record, "losses": result.losses, "seconds": result.seconds, "student_params": student.num_params(),
            "teacher_params": teacher.model.num_params()}
