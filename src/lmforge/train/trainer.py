"""`lmforge train`: pretraining, as a recipe read top to bottom.

    prepare data -> build model -> (resume) -> the one loop (`train.run`) on the LM task
    (`train.lm`) -> final model directory + loss plot + summary

Everything a resumed run needs is in the checkpoint (weights, optimizer, RNG, step; the
data cursor is the step itself, see `BatchLoader`), so on CPU an interrupted-and-resumed
run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import Recipe
from lmforge.data.prepare import adopt_prepared, data_dir_for, prepare, read_index
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.eval.compute import EnergyMeter, write_run_summary
from lmforge.eval.perplexity import EvalResult
from lmforge.model_dir import save_model_dir
from lmforge.train import distributed
from lmforge.train.checkpoint import ModelCheckpoints
from lmforge.train.continued import continued_pretraining, load_initial_weights
from lmforge.train.lm import LMTask
from lmforge.train.metrics import plot_losses
from lmforge.train.run import Run, check_run_dir, stop_record


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    tokens: int
    seconds: float
    train_loss: float
    val: EvalResult | None


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
    with Run.open(recipe.train, run_dir, eval_every=recipe.eval.every, log=log, progress=progress,
                  interrupt_at=interrupt_at, on_validation=on_validation) as run:
        return _train(recipe, run, resume, resume_from)


def _train(recipe: Recipe, run: Run, resume: bool, resume_from: str | None) -> TrainResult:
    run_dir, tc, ctx, device, log = recipe.run.dir, recipe.train, run.ctx, run.device, run.log
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

    torch.manual_seed(tc.seed)
    model = run.new_model(recipe.model)  # under train.parallel pp, only this process's stages are made
    if tc.init_from and not resume:
        load_initial_weights(model, tc.init_from, log)
    model.train()
    flops_per_token = model.flops_per_token(recipe.model.context, training=True)  # of the whole model
    wrapped = run.parallelize(model)  # under train.parallel pp, model is now this process's stage
    task = LMTask(recipe, data_dir, model.lm_head, device, ctx.rows(tc.batch_size))
    run.prepare(model)
    provenance = {"recipe": recipe.model_dump(mode="json"),
                  "data": {"dir": str(data_dir), "fingerprint": index["fingerprint"], "corpus": recipe.data.corpus},
                  **({"parents": [tc.init_from]} if tc.init_from else {})}
    run.start(recipe.to_yaml(), ModelCheckpoints(run_dir, model, tokenizer, provenance, tc.keep_checkpoints, ctx),
              resume, resume_from)

    energy = EnergyMeter(device)
    end = run.fit(task, model, torch.compile(wrapped) if tc.compile else wrapped, label="train",
                  flops_per_token=flops_per_token)
    val = end.val
    provenance["metrics"] = {"val_loss": val.loss, "val_ppl": val.perplexity, "val_bpb": val.bits_per_byte,
                             "train_loss": end.train_loss, "steps": end.steps, "tokens": end.tokens,
                             "seconds": end.seconds}
    # collective under FSDP and pipelines
    weights = run.pipeline.full_model_state() if run.pipeline else distributed.full_model_state(model, ctx)
    model_dir = run_dir / "model"
    if ctx.is_main:
        save_model_dir(distributed.plain_copy(weights, model), tokenizer, model_dir, provenance)
        plot_losses(run_dir)
        write_run_summary(run_dir, flops_per_token, end.tokens, end.steps, end.seconds, device, energy,
                          end.seconds - run.elapsed_before, ctx.world, extra=stop_record(end, run_dir))
    ctx.barrier()
    return TrainResult(run_dir, model_dir, end.steps, end.tokens, end.seconds, end.train_loss, val)
