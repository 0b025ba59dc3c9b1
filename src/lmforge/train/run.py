"""The one training loop: a `Run` trains what a `Task` describes.

    Run.open (device, process group, run directory) -> parallelize the model -> prepare (optimizer)
    -> start (recipe.yaml, resume) -> fit: for each step: accumulate, clip, step, log, validate,
    checkpoint -> LoopEnd

A `Run` owns what every training method shares: the device and precision (`train.distributed`,
`train.precision`), the distributed wrapping, the optimizer and learning-rate schedule
(`train.optim`), the metrics log, stop signals and train.max_minutes, early stopping
(`train.early_stop`), and checkpoints with their RNG state and data cursor, verified before a
resume (`train.recovery`). A `Task` supplies batches by number, the loss of one batch, and an
evaluation: pretraining (`train.lm`), SFT, DPO, classification, tagging and MLM
(`train.finetune` and its task files), distillation (`compress.distill`). Batches are drawn by number from a seeded order, so the
step is the data cursor and a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import LmforgeError, LossDiverged, TrainingInterrupted
from lmforge.model import Transformer
from lmforge.train import distributed, pipeline_parallel, tensor_parallel
from lmforge.train.checkpoint import checkpoint_name, latest_checkpoint, point_link
from lmforge.train.early_stop import EarlyStopping
from lmforge.train.metrics import MetricsLog, plot_losses
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.train.precision import autocast_for, precision_note
from lmforge.train.recovery import checkpoint_folders, find_checkpoint, run_dir_writes


class Task(Protocol):
    """What the loop needs from a training method."""

    tokens_per_batch: int  # of the global batch, for tokens/s and the token count

    def batch(self, index: int) -> Any: ...  # batch number `index`: a tuple or dict of tensors
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...  # model: as the step calls it (wrapped)
    def evaluate(self, model: nn.Module) -> Any: ...  # metrics with val_loss (a dict), or an EvalResult
    # Optional: `log_record() -> dict` adds the task's statistics since the last record to each record.


class TaskStep(nn.Module):
    """What trains (the model, and a task head when there is one) as one module whose forward is
    the task's loss on a batch. Data parallelism wraps this instead of the bare model when the loss
    needs more than the model's forward (the head, the model's hidden states or its `lm_head`):
    DDP then sees the forward the loss runs and averages every trainable parameter's gradient."""

    def __init__(self, task: Task, model: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.model, self.head, self.task = model, head, task

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model, batch)


class Checkpoints(Protocol):
    """How a run's checkpoints hold what trains (a whole model directory, or only the trainable tensors)."""

    def save(self, step: int, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path: ...
    def load(self, folder: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]: ...


@dataclass
class LoopEnd:
    steps: int
    tokens: int
    seconds: float  # of training, resumed runs included
    train_loss: float  # of the last step
    val: Any  # what the final evaluation returned
    stop_reason: str  # max_steps, max_minutes or early_stop
    early: EarlyStopping


def check_run_dir(run_dir: Path, resume: bool, resume_from: str | None = None, another: str = "--run.name") -> None:
    """A new run needs a run directory without checkpoints, and a resumed one a checkpoint. `another`:
    the flag that names a different run directory."""
    if not resume and checkpoint_folders(run_dir):
        raise LmforgeError(f"run directory {run_dir} already has checkpoints: pass --resume to continue it, "
                           f"or choose another {another}")
    if resume and resume_from is None and not checkpoint_folders(run_dir):
        raise LmforgeError(f"nothing to resume in {run_dir}: it has no checkpoint yet")


def val_loss_of(val: Any) -> float:
    """The validation loss in what a task's evaluation returned: an EvalResult or a dict of metrics."""
    return float(val["val_loss"] if isinstance(val, dict) else val.loss)


def val_record(val: Any) -> dict[str, float]:
    """What metrics.jsonl records of an evaluation."""
    if isinstance(val, dict):
        return val
    return {"val_loss": val.loss, "val_ppl": val.perplexity, "val_bpb": val.bits_per_byte}


def stop_record(end: LoopEnd, run_dir: Path) -> dict[str, Any]:
    """What summary.json says of why the run ended and of its best validation."""
    out: dict[str, Any] = {"stop_reason": end.stop_reason}
    if end.stop_reason == "early_stop":
        out["stop_detail"] = end.early.reason()
    if end.early.enabled and end.early.best_step is not None:
        out["best"] = {"step": end.early.best_step, "val_loss": end.early.best_loss,
                       "checkpoint": str(run_dir / "checkpoints" / checkpoint_name(end.early.best_step))}
    return out


class Run:
    """One training run in `run_dir` under train config `tc`; see the module docstring.

    `log` is said on rank 0 only. `interrupt_at` stops as a signal would at that step (for
    tests); `on_validation(step, result)` sees each periodic evaluation and may raise to stop
    the run (hyperparameter search prunes trials this way)."""

    def __init__(self, tc: TrainConfig, run_dir: Path, ctx: distributed.DistContext, device: torch.device, *,
                 eval_every: int, log: Callable[[str], None] = print, progress: bool = True,
                 interrupt_at: int | None = None, on_validation: Callable[[int, Any], None] | None = None):
        self.tc, self.run_dir, self.ctx, self.device = tc, run_dir, ctx, device
        self.eval_every, self.progress = eval_every, progress
        self.log = log if ctx.is_main else (lambda *_: None)
        self.interrupt_at, self.on_validation = interrupt_at, on_validation
        self.early = EarlyStopping(tc.early_stop_patience, tc.early_stop_min_delta)
        self.start_step, self.start_tokens, self.elapsed_before = 0, 0, 0.0
        self.wrapped: nn.Module | None = None
        self.loss_in_forward = False  # the step module's forward is the loss (a TaskStep)
        self.store: Checkpoints | None = None
        self.pipeline: pipeline_parallel.Pipeline | None = None  # train.parallel pp / fsdp+pp: runs the step
        self.tensor_parallel = ctx.active and ctx.strategy in tensor_parallel.LAYOUTS  # the loss on sharded logits

    @classmethod
    @contextlib.contextmanager
    def open(cls, tc: TrainConfig, run_dir: Path, parallel: bool = True, **options) -> Iterator["Run"]:
        """A run on the device train.device names, joined to torchrun's process group when `parallel`
        (else on one process), whose failed writes to `run_dir` are one clear error."""
        if tc.device.startswith("cuda") and not torch.cuda.is_available():
            raise LmforgeError("train.device is cuda but no GPU is visible; use --train.device cpu")
        if parallel:
            ctx, device = distributed.setup(tc.parallel, tc.batch_size, tc.device)
            if tc.parallel in tensor_parallel.LAYOUTS:
                ctx = tensor_parallel.tensor_parallel_context(ctx, tc)
            if tc.parallel in pipeline_parallel.LAYOUTS:
                ctx = pipeline_parallel.pipeline_context(ctx, tc)
        else:
            ctx, device = distributed.DistContext(), distributed.single_device(tc.device)
        try:
            with run_dir_writes(run_dir):
                yield cls(tc, run_dir, ctx, device, **options)
        finally:
            distributed.teardown(ctx)

    # ------------------------------------------------------------------------- set-up

    @property
    def pipelined(self) -> bool:
        """True under train.parallel pp / fsdp+pp with several processes."""
        return self.ctx.active and self.ctx.strategy in pipeline_parallel.LAYOUTS

    def new_model(self, cfg: ModelConfig) -> Transformer:
        """A freshly initialised `Transformer(cfg)` on the run's device; a pipeline's process makes
        only its stages' parameters (the same values one process draws from the same seed)."""
        if self.pipelined:
            return pipeline_parallel.build_stage_model(cfg, self.tc, self.ctx, self.device)
        return Transformer(cfg).to(self.device)

    def parallelize(self, model: nn.Module, step: TaskStep | None = None, partly_used: bool = False) -> nn.Module:
        """`model` as the step calls it: DDP- or FSDP-wrapped under torchrun, its blocks recomputed in
        backward with train.activation_checkpointing. With `step` (`model` with the task's loss as
        its forward, and the task head), DDP wraps `step` instead and the loop calls it for the loss;
        `partly_used`: some trainable parameters may get no gradient (see `distributed.data_parallel`).
        Such a step is not sharded: train.parallel fsdp is refused. Under train.parallel pp / fsdp+pp
        `model` is reduced to this process's pipeline stage and `self.pipeline` runs each step."""
        pipelined = self.pipelined
        if step is None and pipelined:
            if self.tc.activation_checkpointing:
                distributed.checkpoint_activations(model)
            self.pipeline = pipeline_parallel.Pipeline(model, self.tc, self.ctx, self.device)
            self.wrapped = model
            return model
        if pipelined:
            raise LmforgeError(f"train.parallel {self.ctx.strategy} pipelines pretraining only; this run trains "
                               "data-parallel with --train.parallel ddp (or auto)")
        if step is None:
            self.wrapped = distributed.parallelize(model, self.ctx, self.device,
                                                   activation_checkpointing=self.tc.activation_checkpointing)
            return self.wrapped
        if self.tc.activation_checkpointing:
            distributed.checkpoint_activations(model)
        self.wrapped, self.loss_in_forward = step, True
        if self.ctx.active and self.ctx.strategy in ("fsdp", *tensor_parallel.LAYOUTS):
            raise LmforgeError(f"train.parallel {self.ctx.strategy} shards pretraining only; this run trains "
                               "data-parallel with --train.parallel ddp (or auto)")
        if self.ctx.active and self.ctx.strategy == "ddp":
            self.wrapped = distributed.data_parallel(step, self.device, partly_used, sync_buffers=False)
        return self.wrapped

    def prepare(self, trainables: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over what trains (after `parallelize`: FSDP2 replaces the parameters)."""
        self.trainables = trainables
        self.optimizer = build_optimizer(trainables, self.tc, self.device)
        self.autocast = autocast_for(self.device, self.tc.dtype)
        if note := precision_note(self.device, self.tc.dtype):
            self.log(note)
        return self.optimizer

    def start(self, config_yaml: str, store: Checkpoints, resume: bool, resume_from: str | None = None) -> None:
        """Write the resolved config to recipe.yaml and, when resuming, restore the chosen checkpoint:
        what trains, the optimizer, RNG state, step, tokens, time and early-stopping state."""
        self.store = store
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(config_yaml)
        if not resume:
            return
        ckpt = self._choose_checkpoint(resume_from)
        state = store.load(ckpt, self.optimizer)  # collective when several processes train
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        self.start_step, self.elapsed_before = state["step"], state["elapsed"]
        self.start_tokens = state.get("tokens")
        self.early.restore(state.get("early_stop"))
        if self.ctx.is_main:
            point_link(self.run_dir, "latest", ckpt)
        self.log(f"resuming {self.run_dir} from step {self.start_step} ({ckpt.name})")

    def _choose_checkpoint(self, resume_from: str | None) -> Path:
        """Rank 0 verifies the checkpoints and chooses (or finds none); every rank gets its answer."""
        chosen: str | LmforgeError | None = None
        if self.ctx.is_main:
            try:
                chosen = str(find_checkpoint(self.run_dir, resume_from, self.log, set_aside=True))
            except LmforgeError as e:
                chosen = e
        chosen = self.ctx.share(chosen)
        if isinstance(chosen, LmforgeError):
            raise chosen
        return Path(chosen)

    # ------------------------------------------------------------------------- the loop

    def fit(self, task: Task, model: nn.Module, step_model: nn.Module | None = None, *, label: str = "train",
            flops_per_token: float | None = None) -> LoopEnd:
        """Train `model` on `task` to train.max_steps: the learning-rate schedule, the metrics record
        every `log_every` steps, the progress bar, an evaluation every `eval_every` steps and at the
        end, a checkpoint every `checkpoint_every` steps and at the end, and stopping on
        train.max_minutes (checkpoint, then finish) or a signal / `interrupt_at` (checkpoint, then
        raise TrainingInterrupted), and on early stopping (train.early_stop_patience evaluations
        without improvement: a checkpoint at each new best, marked `best`, then finish).
        `step_model` is what the loss calls (the wrapped, maybe compiled, model; by default what
        `parallelize` returned, which a `TaskStep` makes the loss itself); evaluation sees `model`.
        Under torch.distributed the loss is averaged and the stop decisions agreed across ranks;
        only rank 0 writes the metrics, draws the bar and the plot."""
        tc, ctx = self.tc, self.ctx
        self.task, self.model = task, model
        self.step_model = next(m for m in (step_model, self.wrapped, model) if m is not None)
        self.clipped = [p for p in self.trainables.parameters() if p.requires_grad]
        tokens_per_step = tc.grad_accum * task.tokens_per_batch
        if self.start_tokens is None:  # a checkpoint that did not record its token count
            self.start_tokens = self.start_step * tokens_per_step
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if ctx.is_main else None, self.start_step)
        try:
            return self._loop(tokens_per_step, label, flops_per_token)
        finally:
            self.metrics.close()

    def _loop(self, tokens_per_step: int, label: str, flops_per_token: float | None) -> LoopEnd:
        tc, ctx, early = self.tc, self.ctx, self.early
        stop_reason = "max_steps"
        bar = _progress_bar(self.progress and ctx.is_main)
        bar_task = bar.add_task(label, total=tc.max_steps, completed=self.start_step, loss=float("nan"), tps=0.0)
        start = time.perf_counter()
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        last_loss, step, tokens = float("nan"), self.start_step, self.start_tokens
        val, val_step = None, None
        with _StopFlag() as stop, bar:
            while step < tc.max_steps and not early.should_stop:
                lr = lr_at(step, tc)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_ratio", 1.0)
                loss, grad_norm = self._train_step(step)
                step += 1
                tokens += tokens_per_step
                last_loss = ctx.mean(loss)
                if not math.isfinite(last_loss):
                    raise LossDiverged(last_loss, step)
                window_loss += last_loss
                window_steps += 1
                elapsed = self.elapsed_before + time.perf_counter() - start
                out_of_time = ctx.all_true(tc.max_minutes is not None and elapsed >= tc.max_minutes * 60)
                interrupted = ctx.all_true(stop.signal is not None or
                                           (self.interrupt_at is not None and step >= self.interrupt_at))
                # A run that ends early still logs the steps since its last record.
                if step % tc.log_every == 0 or step == tc.max_steps or out_of_time or interrupted:
                    now = time.perf_counter()
                    tps = window_steps * tokens_per_step / max(now - window_start, 1e-9)
                    record = {"step": step, "loss": window_loss / window_steps, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tps}
                    if flops_per_token is not None:
                        record.update(flops_per_s=tps * flops_per_token, tokens=tokens)
                    if hasattr(self.task, "log_record"):  # the task's own statistics (GRPO's rewards)
                        record.update(self.task.log_record())
                    self.metrics.write({**record, "elapsed_s": self.elapsed_before + now - start})
                    bar.update(bar_task, loss=window_loss / window_steps, tps=tps)
                    window_loss, window_steps, window_start = 0.0, 0, now
                bar.update(bar_task, completed=step)
                new_best = False
                if step % self.eval_every == 0 and step < tc.max_steps and not (out_of_time or interrupted):
                    val, val_step = self._validate(step), step
                    if self.on_validation is not None:
                        self.on_validation(step, val)
                    new_best = self._track(step, val)
                if step % tc.checkpoint_every == 0 or interrupted or out_of_time or new_best or early.should_stop:
                    path = self._checkpoint(step, elapsed, tokens, new_best)
                    if interrupted:
                        if ctx.is_main:
                            plot_losses(self.run_dir)
                        raise TrainingInterrupted(step, path)
                if out_of_time:
                    self.log(f"train.max_minutes reached at step {step}")
                    stop_reason = "max_minutes"
                    break
        seconds = self.elapsed_before + time.perf_counter() - start
        if early.should_stop:
            self.log(f"early stop at step {step}: {early.reason()}; best checkpoint: {self.run_dir / 'best'}")
            stop_reason = "early_stop"
        new_best = False
        if val_step != step:  # the run's last step has not been evaluated yet
            val = self._validate(step)
            new_best = self._track(step, val)
        latest = latest_checkpoint(self.run_dir)
        if new_best or latest is None or latest.name != checkpoint_name(step):
            self._checkpoint(step, seconds, tokens, new_best)
        return LoopEnd(step, tokens, seconds, last_loss, val, stop_reason, early)

    def _train_step(self, step: int) -> tuple[float, float]:
        """Accumulate train.grad_accum micro-batches, clip, step: (mean loss, gradient norm)."""
        tc = self.tc
        loss_sum = 0.0
        if self.ctx.active:
            # Every process starts from the same seed: without this, each would draw the same dropout
            # masks (LoRA's) for its own rows. Seeded by the step, a resumed run draws the same ones.
            torch.manual_seed((tc.seed * 1_000_003 + step) * 65_537 + self.ctx.rank)
        for micro in range(tc.grad_accum):
            batch = _to_device(self.task.batch(step * tc.grad_accum + micro), self.device)
            if self.pipeline is not None:  # the schedule runs forward and backward through the stages
                with self.autocast:
                    loss_sum += self.pipeline.train_step(batch, tc.grad_accum)
                continue
            with distributed.no_gradient_sync(self.wrapped, self.ctx, micro == tc.grad_accum - 1), \
                    tensor_parallel.loss_context(self.tensor_parallel):
                with self.autocast:
                    loss = self.step_model(batch) if self.loss_in_forward else self.task.loss(self.step_model, batch)
                (loss / tc.grad_accum).backward()
            loss_sum += loss.item()
        if self.pipeline is not None:
            grad_norm = self.pipeline.clip_gradients(tc.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.clipped, tc.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / tc.grad_accum, grad_norm

    def _validate(self, step: int) -> Any:
        self.trainables.eval()
        with torch.no_grad(), autocast_for(self.device, self.tc.dtype), tensor_parallel.loss_context(self.tensor_parallel):
            result = self.task.evaluate(self.model) if self.pipeline is None else self.pipeline.evaluate(self.task)
        self.trainables.train()
        self.metrics.write({"step": step, **val_record(result)})
        return result

    def _track(self, step: int, val: Any) -> bool:
        """Record an evaluation with the early-stopping tracker; True when a `best` checkpoint is due.
        Rank 0's loss decides, so that every rank stops (and checkpoints) at the same step."""
        return self.early.update(step, self.ctx.share(val_loss_of(val))) and self.early.enabled

    def _checkpoint(self, step: int, elapsed: float, tokens: int, best: bool) -> Path:
        state = {"step": step, "rng_cpu": torch.get_rng_state(), "tokens": tokens, "elapsed": elapsed,
                 "early_stop": self.early.state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        path = self.store.save(step, self.optimizer, state)  # collective when several processes train
        if best and self.ctx.is_main:
            point_link(self.run_dir, "best", path)
        return path


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return tuple(v.to(device, non_blocking=True) for v in batch)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(), disable=not enabled, transient=False,
    )
