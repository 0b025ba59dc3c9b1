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

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from pydantic import field_validator
from torch import nn

from lmforge.config import Section, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.model import Transformer


class DistillConfig(Section):
    steps: int = 200
    batch_size: int = 16
    seq_len: int | None = None  # default: the student's context
    lr: float = 3e-3
    temperature: float = 2.0
    alpha: float = 0.9  # weight of the KL term; 1 - alpha goes to cross-entropy
    top_k: int = 0  # 0: full teacher distribution
    pool: int = 0  # distinct batches, revisited in turn (0: as many as steps)
    hidden_weight: float = 3.0  # beta: weight of the hidden-state term (0: logits only)
    checkpoint_every: int | None = None  # steps between checkpoints (None: at the end, and when interrupted)
    seed: int = 0

    @field_validator("steps", "batch_size", "seq_len", "lr", "temperature", "checkpoint_every")
    @classmethod
    def _positive(cls, value):
        if value is not None and value <= 0:
            raise ValueError("must be positive")
        return value

    @field_validator("top_k", "pool", "hidden_weight")
    @classmethod
    def _not_negative(cls, value):
        if value < 0:
            raise ValueError("must be >= 0")
        return value

    @field_validator("alpha")
    @classmethod
    def _share(cls, value):
        if not 0.0 <= value <= 1.0:
            raise ValueError("must be in [0, 1]")
        return value


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


class DistillTask:
    """Distillation as a task of the one training loop (`train.run`): it holds the teacher.
    Batches come from the prepared data's train split (`pool` distinct ones, revisited in turn);
    the loss is `distill_loss` against the teacher's targets, plus the hidden-state term through
    block hooks (and learned width maps, `maps`, when the widths differ); evaluation is the
    student's perplexity on 8 batches of the val split."""

    def __init__(self, teacher: Transformer, student: Transformer, data_dir: Path, cfg: DistillConfig, log):
        from lmforge.data.loader import BatchLoader, TokenSplit

        if teacher.config.vocab != student.config.vocab:
            raise LmforgeError(f"teacher and student vocabularies differ ({teacher.config.vocab} vs "
                               f"{student.config.vocab}): they must share a tokenizer")
        split = TokenSplit(data_dir, "train")
        if split.vocab_size > student.config.vocab:
            raise LmforgeError(f"{data_dir} was tokenized with a larger vocabulary than the models have")
        self.seq_len = min(cfg.seq_len or student.config.context, student.config.context, teacher.config.context)
        self.loader = BatchLoader(split, cfg.batch_size, self.seq_len, cfg.seed)
        self.val = TokenSplit(data_dir, "val")
        self.teacher, self.cfg, self.log = teacher, cfg, log
        self.tokens_per_batch = cfg.batch_size * self.seq_len
        self.cache: dict[int, TeacherTargets] = {}
        self.steps_done = 0
        self.maps: nn.ModuleList | None = None
        self.hooks: tuple[BlockOutputs, BlockOutputs] | None = None
        if cfg.hidden_weight > 0:
            self.hooks = (BlockOutputs(student, list(range(student.config.n_layer))),
                          BlockOutputs(teacher, matched_layers(student.config.n_layer, teacher.config.n_layer)))
            if student.config.d_model != teacher.config.d_model:
                with torch.random.fork_rng():  # seeded, without moving the caller's random state
                    torch.manual_seed(cfg.seed)
                    self.maps = nn.ModuleList(nn.Linear(student.config.d_model, teacher.config.d_model, bias=False)
                                              for _ in range(student.config.n_layer))

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        index = index % self.cfg.pool if self.cfg.pool else index
        x, y = self.loader.batch(index)
        return {"index": torch.tensor(index), "x": x, "y": y}

    def targets(self, index: int, x: torch.Tensor) -> TeacherTargets:
        """The teacher's targets for batch `index` (with top_k, computed once per batch and cached)."""
        if index in self.cache:
            return self.cache[index]
        with torch.no_grad():
            logits = self.teacher(x)
            t = summarize_teacher(logits, self.cfg.temperature, self.cfg.top_k,
                                  self.hooks[1].take() if self.hooks else None)
        if self.cfg.top_k:
            self.cache[index] = t
        return t

    def loss(self, model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        t = self.targets(int(b["index"]), b["x"])
        loss = distill_loss(model(b["x"]), b["y"], t, cfg.temperature, cfg.alpha)
        if self.hooks:
            loss = loss + cfg.hidden_weight * hidden_loss(self.hooks[0].take(), t.hidden, self.maps)
        step, self.steps_done = self.steps_done, self.steps_done + 1
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
            self.log(f"step {step + 1}/{cfg.steps}: loss {loss.item():.4f}")
        return loss

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from lmforge.eval.perplexity import evaluate_split

        r = evaluate_split(model, self.val, max_batches=8)
        return {"val_loss": r.loss, "val_ppl": r.perplexity}

    def close(self) -> None:
        for hooks in self.hooks or ():
            hooks.close()


def train_config(cfg: DistillConfig, device: torch.device) -> TrainConfig:
    """The training settings of a distillation: AdamW (weight decay 0.01 on matrices), a warmup of a
    twentieth of the steps, cosine down to a tenth of the peak, gradient norm clipped at 1, fp32; a
    checkpoint every `checkpoint_every` steps (keeping the newest), at the end and when interrupted,
    and every step's loss in metrics.jsonl."""
    return TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, min_lr_ratio=0.1, schedule="cosine",
                       warmup=max(1, cfg.steps // 20), max_steps=cfg.steps, weight_decay=0.01, grad_clip=1.0,
                       seed=cfg.seed, device=str(device), dtype="float32",
                       checkpoint_every=cfg.checkpoint_every or cfg.steps, keep_checkpoints=1, log_every=1)


def default_run_dir(out: Path) -> Path:
    """Where `lmforge distill --out OUT` keeps its run (recipe.yaml, metrics.jsonl, checkpoints): beside OUT."""
    out = Path(out)
    return out.parent / f"{out.name}-run"


def distill(teacher: Transformer, student: Transformer, data_dir: Path, cfg: DistillConfig, log=lambda s: None,
            run_dir: Path | None = None, resume: bool = False, interrupt_at: int | None = None) -> DistillResult:
    """Train `student` on `teacher` (see the module docstring) on the one training loop, in `run_dir`
    (recipe.yaml, metrics.jsonl, checkpoints; a temporary directory when None). `resume` continues
    from the run's newest intact checkpoint (`student` as it was built: the checkpoint replaces its
    weights); `interrupt_at` stops as a signal would at that step (for tests)."""
    import tempfile

    from lmforge.train.checkpoint import TrainableCheckpoints
    from lmforge.train.metrics import read_metrics
    from lmforge.train.run import Run, check_run_dir

    if run_dir is not None:
        check_run_dir(run_dir, resume, another="--run-dir")
    elif resume:
        raise LmforgeError("resuming a distillation needs its run directory")
    task = DistillTask(teacher, student, Path(data_dir), cfg, log)
    teacher.eval()
    with contextlib.ExitStack() as stack:
        stack.callback(task.close)
        if run_dir is None:
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmforge-distill-")))
        result = DistillResult(val_before=task.evaluate(student)["val_ppl"])  # the student as built
        student.train()
        tc = train_config(cfg, next(student.parameters()).device)
        run = stack.enter_context(Run.open(tc, run_dir, parallel=False, eval_every=cfg.steps, log=log, progress=False,
                                           interrupt_at=interrupt_at))
        trainables = nn.ModuleList([student] + ([task.maps] if task.maps is not None else []))
        run.parallelize(student)
        run.prepare(trainables)
        run.start(yaml.safe_dump({"distill": cfg.model_dump(mode="json")}, sort_keys=False),
                  TrainableCheckpoints(run_dir, trainables, None, keep=1), resume)
        task.steps_done = run.start_step
        end = run.fit(task, student, label="distill")
        result.losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    student.eval()
    result.seconds = end.seconds
    result.val_after = end.val["val_ppl"]
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
    if recipe.train.parallel not in ("auto", "ddp"):
        raise LmforgeError(f"--student recipe sets train.parallel {recipe.train.parallel}, but lmforge distill "
                           "trains on one process; remove it (distillation uses only the recipe's model section)")
    recipe.model.vocab_size = teacher_vocab
    torch.manual_seed(seed)
    return Transformer(recipe.model), None


def run_distill(teacher_dir, student_spec: str, data_dir, out, cfg: DistillConfig, log=print,
                run_dir: Path | None = None, resume: bool = False, interrupt_at: int | None = None) -> dict[str, Any]:
    """Distill `teacher_dir` into a student (`build_student`) and write it to `out`; the run (its
    checkpoints, to `resume` from) is `run_dir`, by default `default_run_dir(out)`."""
    import os

    import lmforge
    from lmforge.compress.storage import is_quantized_dir
    from lmforge.model_dir import save_model_dir

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LmforgeError("lmforge distill trains on one process, not under torchrun (no data, tensor or "
                           "pipeline parallelism); run it without torchrun")
    if is_quantized_dir(teacher_dir) is not None:
        log("note: the teacher is quantized; its logits are the quantized model's")
    if not Path(data_dir).is_dir():
        raise LmforgeError(f"--data must be a prepared data directory (`lmforge data prepare`), not {data_dir}")
    teacher = lmforge.load(teacher_dir)
    student, tokenizer = build_student(student_spec, teacher.config.vocab, cfg.seed)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(Path(out))
    result = distill(teacher.model, student, Path(data_dir), cfg, log, run_dir, resume, interrupt_at)
    record = {"teacher": str(teacher_dir), "student": student_spec, "steps": cfg.steps, "temperature": cfg.temperature,
              "alpha": cfg.alpha, "top_k": cfg.top_k, "hidden_weight": cfg.hidden_weight, "val_perplexity_before": result.val_before,
              "val_perplexity_after": result.val_after}
    save_model_dir(student, tokenizer or teacher.tokenizer, out, {"parents": [str(teacher_dir)], "distillation": record})
    return {**record, "losses": result.losses, "seconds": result.seconds, "student_params": student.num_params(),
            "teacher_params": teacher.model.num_params(), "run_dir": str(run_dir)}
