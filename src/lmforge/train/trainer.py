"""The pretraining loop: one plain loop, no callbacks.

    prepare data -> build model -> (resume) -> for each step: accumulate, clip, step,
    log, validate, checkpoint -> final model directory + loss plot

Everything a resumed run needs is in the checkpoint (weights, optimizer, RNG, step; the
data cursor is the step itself, see `BatchLoader`), so on CPU an interrupted-and-resumed
run ends with exactly the weights of an uninterrupted one.

`run_steps` is the step loop itself (schedule, logging, validation, checkpoints, stopping on
time or a signal); fine-tuning (`finetune.py`) runs its own task's steps through it too.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import Recipe, TrainConfig
from lmforge.data.loader import BatchLoader, TokenSplit
from lmforge.data.prepare import adopt_prepared, prepare, read_index
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError, LossDiverged, TrainingInterrupted
from lmforge.eval.compute import EnergyMeter, write_run_summary
from lmforge.eval.perplexity import EvalResult, evaluate_split
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir
from lmforge.train import distributed
from lmforge.train.checkpoint import checkpoint_name, latest_checkpoint, load_checkpoint, point_link, save_checkpoint
from lmforge.train.continued import continued_pretraining, load_initial_weights
from lmforge.train.early_stop import EarlyStopping
from lmforge.train.losses import language_model_loss
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.train.recovery import checkpoint_folders, find_checkpoint, run_dir_writes


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    tokens: int
    seconds: float
    train_loss: float
    val: EvalResult | None


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), which oneDNN's
    bf16 matmuls use; without them bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def resolve_dtype(device: torch.device, dtype_name: str) -> str:
    """train.dtype `auto`: bf16 autocast on a GPU, and on a CPU that multiplies bf16 natively
    (a training step of a 6 x 384 GPT-2 ran 2.6x faster than in fp32 on a 2-core AVX512-BF16
    EPYC, benchmarks/RESULTS.md); fp32 elsewhere."""
    if dtype_name != "auto":
        return dtype_name
    if device.type == "cuda" or (device.type == "cpu" and cpu_multiplies_bf16()):
        return "bfloat16"
    return "float32"


def precision_note(device: torch.device, dtype_name: str) -> str | None:
    """A line for the one choice of `auto` a CPU user may not expect (bf16), else None."""
    if dtype_name == "auto" and device.type == "cpu" and resolve_dtype(device, dtype_name) == "bfloat16":
        return "precision: bf16 autocast (train.dtype auto: this CPU multiplies bf16 natively; " \
               "--train.dtype float32 for fp32)"
    return None


def autocast_for(device: torch.device, dtype_name: str):
    """The autocast context for train.dtype (see `resolve_dtype`); fp32 is no autocast at all."""
    dtype_name = resolve_dtype(device, dtype_name)
    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype_name))


def data_dir_for(recipe: Recipe) -> Path:
    if recipe.data.dir:
        return Path(recipe.data.dir)
    name = Path(recipe.data.corpus.rstrip("/")).name.replace("*", "_") or "corpus"
    tok = f"tok-{Path(recipe.data.tokenizer.path).name}" if recipe.data.tokenizer.path else f"v{recipe.data.tokenizer.vocab_size}"
    return Path(recipe.run.out) / "data" / f"{name}-{tok}"


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


class MetricsLog:
    """Appends one JSON object per line; a log without a path (other ranks) writes nothing.

    A run that starts at `start_step` (0, or the step of the checkpoint it resumes from) first
    cuts the log back to the records up to that step: the steps after it ran in a process whose
    work is lost, and are about to run again."""

    def __init__(self, path: Path | None, start_step: int = 0):
        if path is not None and path.is_file():
            kept = [line + "\n" for line in path.read_text().splitlines()
                    if line.strip() and _step_of_record(line) <= start_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)
        self._f = open(path, "a") if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _step_of_record(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash
        return math.inf


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl`, each step once: a log written before resumes cut it back
    (see `MetricsLog`) can repeat steps, and then the last record of a step and kind (training
    or validation) is the one kept, at the place of the first. A line cut short is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records: dict[tuple[Any, bool], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records[(record["step"], "loss" in record)] = record
    return list(records.values())


def stop_record(end: "LoopEnd", run_dir: Path) -> dict[str, Any]:
    """What summary.json says of why the run ended and of its best validation."""
    out: dict[str, Any] = {"stop_reason": end.stop_reason}
    if end.stop_reason == "early_stop":
        out["stop_detail"] = end.early.reason()
    if end.early.enabled and end.early.best_step is not None:
        out["best"] = {"step": end.early.best_step, "val_loss": end.early.best_loss,
                       "checkpoint": str(run_dir / "checkpoints" / checkpoint_name(end.early.best_step))}
    return out


def plot_losses(run_dir: Path) -> Path | None:
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    from lmforge.plotting import pyplot

    plt = pyplot()  # headless, with a CJK fallback font

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "plots" / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass
class LoopEnd:
    steps: int
    tokens: int
    seconds: float  # of training, resumed runs included
    train_loss: float  # of the last step
    val: Any  # what the final `validate` returned
    stop_reason: str  # max_steps, max_minutes or early_stop
    early: EarlyStopping


def val_loss_of(val: Any) -> float:
    """The validation loss in what `validate` returned: pretraining's EvalResult or a task's metrics."""
    return float(val["val_loss"] if isinstance(val, dict) else val.loss)


def run_steps(train_step: Callable[[int], tuple[float, float]], optimizer: torch.optim.Optimizer, tc: TrainConfig, *,
              eval_every: int, run_dir: Path, start_step: int, start_tokens: int, elapsed_before: float,
              tokens_per_step: int, metrics: MetricsLog, validate: Callable[[int], Any],
              checkpoint: Callable[[int, float, int], Path], log, bar_label: str, progress: bool,
              ctx: distributed.DistContext | None = None, flops_per_token: float | None = None,
              interrupt_at: int | None = None,
              on_validation: Callable[[int, Any], None] | None = None,
              early: EarlyStopping | None = None) -> LoopEnd:
    """The loop pretraining and fine-tuning share, around their own `train_step(step) -> (mean loss,
    grad norm)` (accumulate, clip, optimizer step): the learning-rate schedule, the metrics record
    every `log_every` steps, the progress bar, `validate(step)` every `eval_every` steps and at the
    end, `checkpoint(step, elapsed, tokens)` every `checkpoint_every` steps and at the end, and
    stopping on train.max_minutes (checkpoint, then finish) or a signal / `interrupt_at`
    (checkpoint, then raise TrainingInterrupted), and on `early` (train.early_stop_patience
    validations without improvement: a checkpoint at each new best, marked `best`, then finish).
    The caller's `checkpoint` records `early.state()`. Under torch.distributed the loss is averaged
    and the stop decisions agreed across ranks; only rank 0 draws the bar and the plot."""
    ctx = ctx or distributed.DistContext()
    early = early or EarlyStopping(patience=0)
    stop_reason = "max_steps"

    def track(step: int, val: Any) -> bool:
        """Record a validation with the early-stopping tracker; True when a `best` checkpoint is due.
        Rank 0's loss decides, so that every rank stops (and checkpoints) at the same step."""
        return early.update(step, ctx.share(val_loss_of(val))) and early.enabled

    bar = _progress_bar(progress and ctx.is_main)
    task = bar.add_task(bar_label, total=tc.max_steps, completed=start_step, loss=float("nan"), tps=0.0)
    start = time.perf_counter()
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    last_loss, step, tokens = float("nan"), start_step, start_tokens
    val, val_step = None, None
    with _StopFlag() as stop, bar:
        while step < tc.max_steps and not early.should_stop:
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = train_step(step)
            step += 1
            tokens += tokens_per_step
            last_loss = ctx.mean(loss)
            if not math.isfinite(last_loss):
                raise LossDiverged(last_loss, step)
            window_loss += last_loss
            window_steps += 1
            elapsed = elapsed_before + time.perf_counter() - start
            out_of_time = ctx.all_true(tc.max_minutes is not None and elapsed >= tc.max_minutes * 60)
            interrupted = ctx.all_true(stop.signal is not None or (interrupt_at is not None and step >= interrupt_at))
            # A run that ends early still logs the steps since its last record.
            if step % tc.log_every == 0 or step == tc.max_steps or out_of_time or interrupted:
                now = time.perf_counter()
                tps = window_steps * tokens_per_step / max(now - window_start, 1e-9)
                record = {"step": step, "loss": window_loss / window_steps, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": tps}
                if flops_per_token is not None:
                    record.update(flops_per_s=tps * flops_per_token, tokens=tokens)
                metrics.write({**record, "elapsed_s": elapsed_before + now - start})
                bar.update(task, loss=window_loss / window_steps, tps=tps)
                window_loss, window_steps, window_start = 0.0, 0, now
            bar.update(task, completed=step)
            new_best = False
            if step % eval_every == 0 and step < tc.max_steps and not (out_of_time or interrupted):
                val, val_step = validate(step), step
                if on_validation is not None:
                    on_validation(step, val)
                new_best = track(step, val)
            if step % tc.checkpoint_every == 0 or interrupted or out_of_time or new_best or early.should_stop:
                path = checkpoint(step, elapsed, tokens)
                if new_best and ctx.is_main:
                    point_link(run_dir, "best", path)
                if interrupted:
                    if ctx.is_main:
                        plot_losses(run_dir)
                    raise TrainingInterrupted(step, path)
            if out_of_time:
                log(f"train.max_minutes reached at step {step}")
                stop_reason = "max_minutes"
                break
    seconds = elapsed_before + time.perf_counter() - start
    if early.should_stop:
        log(f"early stop at step {step}: {early.reason()}; best checkpoint: {run_dir / 'best'}")
        stop_reason = "early_stop"
    new_best = False
    if val_step != step:  # the run's last step has not been validated yet
        val = validate(step)
        new_best = track(step, val)
    latest = latest_checkpoint(run_dir)
    if new_best or latest is None or latest.name != checkpoint_name(step):
        path = checkpoint(step, seconds, tokens)
        if new_best and ctx.is_main:
            point_link(run_dir, "best", path)
    return LoopEnd(step, tokens, seconds, last_loss, val, stop_reason, early)


def check_run_dir(run_dir: Path, resume: bool, resume_from: str | None = None) -> None:
    """A new run needs a run directory without checkpoints, and a resumed one a checkpoint."""
    if not resume and checkpoint_folders(run_dir):
        raise LmforgeError(f"run directory {run_dir} already has checkpoints: pass --resume to continue it, "
                           "or choose another --run.name")
    if resume and resume_from is None and not checkpoint_folders(run_dir):
        raise LmforgeError(f"nothing to resume in {run_dir}: it has no checkpoint yet")


def train(recipe: Recipe, resume: bool = False, progress: bool = True, log=print,
          interrupt_at: int | None = None,
          on_validation: Callable[[int, EvalResult], None] | None = None,
          resume_from: str | None = None) -> TrainResult:
    """Run a recipe. `resume` continues from the newest intact checkpoint, `resume_from`
    (`step-N` or a checkpoint path) from that one. `interrupt_at` stops as a signal would at
    that step (for tests); `on_validation(step, result)` sees each periodic validation and may
    raise to stop the run (hyperparameter search prunes trials this way)."""
    run_dir = recipe.run.dir
    resume = resume or resume_from is not None
    check_run_dir(run_dir, resume, resume_from)
    recipe = recipe.model_copy(update={"data": adopt_prepared(recipe.data)})
    if recipe.train.init_from:
        recipe = continued_pretraining(recipe, log)
    tc = recipe.train
    if tc.device.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError("train.device is cuda but no GPU is visible; use --train.device cpu")
    ctx, device = distributed.setup(tc.parallel, tc.batch_size, tc.device)
    try:
        with run_dir_writes(run_dir):
            return _train(recipe, resume, resume_from, progress, log if ctx.is_main else (lambda *_: None),
                          interrupt_at, on_validation, ctx, device)
    finally:
        distributed.teardown(ctx)


def _choose_checkpoint(run_dir: Path, resume_from: str | None, log, ctx: distributed.DistContext) -> Path:
    """Rank 0 verifies the checkpoints and chooses (or finds none); every rank gets its answer."""
    chosen: str | LmforgeError | None = None
    if ctx.is_main:
        try:
            chosen = str(find_checkpoint(run_dir, resume_from, log, set_aside=True))
        except LmforgeError as e:
            chosen = e
    chosen = ctx.share(chosen)
    if isinstance(chosen, LmforgeError):
        raise chosen
    return Path(chosen)


def _train(recipe: Recipe, resume: bool, resume_from: str | None, progress: bool, log, interrupt_at: int | None,
           on_validation, ctx: distributed.DistContext, device: torch.device) -> TrainResult:
    run_dir, tc = recipe.run.dir, recipe.train
    if ctx.is_main:  # one process prepares; the others then find it ready
        prepare(recipe.data, data_dir_for(recipe), progress=lambda s: log(f"data: {s}"))
    ctx.barrier()
    data_dir = prepare(recipe.data, data_dir_for(recipe))
    tokenizer = TextTokenizer.load(data_dir)
    index = read_index(data_dir)
    if recipe.model.vocab_size is None:
        recipe.model.vocab_size = tokenizer.vocab_size
    elif recipe.model.vocab_size < tokenizer.vocab_size:
        raise LmforgeError(f"model.vocab_size {recipe.model.vocab_size} is smaller than the tokenizer's "
                           f"{tokenizer.vocab_size}; leave it unset to follow the tokenizer")
    train_split, val_split = TokenSplit(data_dir, "train"), TokenSplit(data_dir, "val")
    seq_len = recipe.model.context
    loader = BatchLoader(train_split, tc.batch_size, seq_len, tc.seed)

    torch.manual_seed(tc.seed)
    model = Transformer(recipe.model).to(device)
    if tc.init_from and not resume:
        load_initial_weights(model, tc.init_from, log)
    model.train()
    wrapped = distributed.parallelize(model, ctx, device, activation_checkpointing=tc.activation_checkpointing)
    optimizer = build_optimizer(model, tc, device)  # after sharding: FSDP2 replaces the parameters
    autocast = autocast_for(device, tc.dtype)
    if ctx.is_main and (note := precision_note(device, tc.dtype)):
        log(note)
    step_fn = torch.compile(wrapped) if tc.compile else wrapped
    rows = ctx.rows(tc.batch_size)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    early = EarlyStopping(tc.early_stop_patience, tc.early_stop_min_delta)
    if resume:
        ckpt = _choose_checkpoint(run_dir, resume_from, log, ctx)
        state = load_checkpoint(ckpt, model, optimizer, ctx)  # collective when several processes train
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        start_step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        early.restore(state.get("early_stop"))
        if ctx.is_main:
            point_link(run_dir, "latest", ckpt)
        log(f"resuming {run_dir} from step {start_step} ({ckpt.name})")
    provenance = {"recipe": recipe.model_dump(mode="json"),
                  "data": {"dir": str(data_dir), "fingerprint": index["fingerprint"], "corpus": recipe.data.corpus},
                  **({"parents": [tc.init_from]} if tc.init_from else {})}
    metrics = MetricsLog(run_dir / "metrics.jsonl" if ctx.is_main else None, start_step)
    tokens_per_step = tc.batch_size * tc.grad_accum * seq_len
    flops_per_token = model.flops_per_token(seq_len, training=True)

    def checkpoint(step: int, elapsed: float, tokens: int) -> Path:
        state = {"step": step, "rng_cpu": torch.get_rng_state(), "tokens": tokens, "elapsed": elapsed,
                 "early_stop": early.state()}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        return save_checkpoint(run_dir, step, model, optimizer, tokenizer, state, provenance,
                               tc.keep_checkpoints, ctx)  # collective when several processes train

    def validate(step: int) -> EvalResult:
        result = evaluate_split(model, val_split, batch_size=tc.batch_size, max_batches=recipe.eval.batches,
                                seq_len=seq_len, autocast=autocast_for(device, tc.dtype))
        metrics.write({"step": step, "val_loss": result.loss, "val_ppl": result.perplexity,
                       "val_bpb": result.bits_per_byte})
        return result

    def train_step(step: int) -> tuple[float, float]:
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = loader.batch(step * tc.grad_accum + micro)
            x, y = x[rows].to(device, non_blocking=True), y[rows].to(device, non_blocking=True)
            with distributed.no_gradient_sync(wrapped, ctx, micro == tc.grad_accum - 1):
                with autocast:
                    loss = language_model_loss(step_fn, model.lm_head, x, y, tc.loss_chunk)
                (loss / tc.grad_accum).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / tc.grad_accum, grad_norm

    energy = EnergyMeter(device)
    try:
        end = run_steps(train_step, optimizer, tc, eval_every=recipe.eval.every, run_dir=run_dir,
                        start_step=start_step, start_tokens=tokens_seen, elapsed_before=elapsed_before,
                        tokens_per_step=tokens_per_step, metrics=metrics, validate=validate, checkpoint=checkpoint,
                        log=log, bar_label="train", progress=progress, ctx=ctx, flops_per_token=flops_per_token,
                        interrupt_at=interrupt_at, on_validation=on_validation, early=early)
        step, tokens_seen, seconds, last_loss, val = end.steps, end.tokens, end.seconds, end.train_loss, end.val
        provenance["metrics"] = {"val_loss": val.loss, "val_ppl": val.perplexity, "val_bpb": val.bits_per_byte,
                                 "train_loss": last_loss, "steps": step, "tokens": tokens_seen, "seconds": seconds}
        weights = distributed.full_model_state(model, ctx)  # collective under FSDP
        model_dir = run_dir / "model"
        if ctx.is_main:
            save_model_dir(distributed.plain_copy(weights, model), tokenizer, model_dir, provenance)
            plot_losses(run_dir)
            write_run_summary(run_dir, flops_per_token, tokens_seen, step, seconds, device, energy,
                              seconds - elapsed_before, ctx.world, extra=stop_record(end, run_dir))
        ctx.barrier()
    finally:
        metrics.close()
    return TrainResult(run_dir, model_dir, step, tokens_seen, seconds, last_loss, val)


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(), disable=not enabled, transient=False,
    )
