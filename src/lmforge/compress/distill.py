"""`lmforge distill`: train a smaller student on a teacher's logits.

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, data)

where `_T` is a softmax at temperature T (Hinton et al., 2015; the T^2 keeps the gradient
scale independent of T). With `top_k`, the teacher is summarized by its k largest logits
per position (renormalized over those k) and those are cached per batch, so a run that
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

from lmforge.errors import LmforgeError
from lmforge.model import Transformer


@dataclass
class DistillConfig:
    steps: int = 200
    batch_size: int = 16
    seq_len: int | None = None  # default: the student's context
    lr: float = 3e-3
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KL term; 1 - alpha goes to cross-entropy
    top_k: int = 0  # 0: full teacher distribution
    pool: int = 0  # distinct batches, revisited in turn (0: as many as steps)
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


@dataclass
class DistillResult:
    losses: list[float] = field(default_factory=list)
    val_before: float | None = None
    val_after: float | None = None
    seconds: float = 0.0


def distill_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor | None],
                 temperature: float, alpha: float) -> torch.Tensor:
    """`teacher` is (full logits, None) or (top-k logits, their token indices)."""
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).float()
    ce = F.cross_entropy(s, targets.reshape(-1))
    t_logits, t_index = teacher
    t_logits = t_logits.reshape(-1, t_logits.shape[-1]).float()
    log_s = F.log_softmax(s / temperature, dim=-1)
    if t_index is not None:
        log_s = log_s.gather(1, t_index.reshape(-1, t_index.shape[-1]))
    p_t = F.softmax(t_logits / temperature, dim=-1)
    kl = (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_s)).sum(-1).mean()
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


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
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, cfg.steps // 20)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    start = time.perf_counter()
    for step in range(cfg.steps):
        index = step % cfg.pool if cfg.pool else step
        x, y = loader.batch(index)
        if index in cache:
            t = cache[index]
        else:
            with torch.no_grad():
                logits = teacher(x)
            t = tuple(logits.topk(cfg.top_k, dim=-1)) if cfg.top_k else (logits, None)
            if cfg.top_k:
                cache[index] = t
        lr = cfg.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = distill_loss(student(x), y, t, cfg.temperature, cfg.alpha)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
            log(f"step {step + 1}/{cfg.steps}: loss {loss.item():.4f}")
    student.eval()
    result.seconds = time.perf_counter() - start
    result.val_after = evaluate_split(student, val, max_batches=8).perplexity
    return result


def build_student(spec: str, teacher_vocab: int):
    """(model, tokenizer or None): a model directory, or a recipe name/file for a fresh model."""
    import lmforge

    if Path(spec).is_dir():
        m = lmforge.load(spec)
        return m.model, m.tokenizer
    from lmforge.config import load_recipe

    recipe = load_recipe(spec, [])
    recipe.model.vocab_size = teacher_vocab
    torch.manual_seed(0)
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
    student, tokenizer = build_student(student_spec, teacher.config.vocab)
    result = distill(teacher.model, student, Path(data_dir), cfg, log)
    record = {"teacher": str(teacher_dir), "student": student_spec, "steps": cfg.steps, "temperature": cfg.temperature,
              "alpha": cfg.alpha, "top_k": cfg.top_k, "val_perplexity_before": result.val_before,
              "val_perplexity_after": result.val_after}
    save_model_dir(student, tokenizer or teacher.tokenizer, out, {"parents": [str(teacher_dir)], "distillation": record})
    return {**record, "losses": result.losses, "seconds": result.seconds, "student_params": student.num_params(),
            "teacher_params": teacher.model.num_params()}
