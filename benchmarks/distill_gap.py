"""Does a distilled half-depth student close at least half of the perplexity gap? (issue 6)

    python benchmarks/distill_gap.py --threads 1

In one run, on the quickstart recipe's model (Llama-style, 4 layers, 192 wide, context 128)
and the built-in `shakespeare` corpus (vocabulary 2048):

1. a teacher: the quickstart recipe trained for --teacher-steps steps by `lmforge train`'s
   trainer (or an existing model directory, --teacher DIR, with the --data it was trained on);
2. the scratch student: the teacher's configuration with half the layers (--student-layers,
   --student-width to change), trained from scratch for --steps steps by the same trainer with the
   quickstart recipe's batch and peak learning rate;
3. the distilled student: the same configuration, the same initial weights (same seed) and the
   same batches (the loader is seeded the same way), trained for the same --steps steps by
   `lmforge distill`'s loop (lmforge.compress.distill.distill) on the teacher's logits;
4. the validation perplexity of all three by lmforge.eval.perplexity.evaluate_split on the whole
   validation split (windows of the context length, 8 per batch), and

       gap closed = (ppl_scratch - ppl_distilled) / (ppl_scratch - ppl_teacher)

   against the target >= 0.5.

The two students see the same tokens with the same peak learning rate and schedule: the scratch
student's recipe takes the distill loop's warmup (steps/20) and weight decay (0.01) instead of the
quickstart's (warmup 50 capped at steps/10, decay 0.1), so that the loss is what differs. What
remains different is the loops' bookkeeping (the trainer decays only matrices; its cosine starts
after the warmup). `--control` also trains the student through the distill loop itself with
alpha 0 (cross-entropy only) to show how much that is, and prints the gap closed against it too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from pydantic import ValidationError

from common import machine
from lmforge.compress.distill import DistillConfig
from lmforge.config import DataConfig, ModelConfig, Recipe, describe_validation_error, load_recipe
from lmforge.errors import LmforgeError

TARGET = 0.5


def data_config(data_dir: Path) -> DataConfig:
    """The DataConfig a prepared directory was made with (so the trainer reuses it as it is)."""
    from lmforge.data.prepare import read_index

    s = read_index(data_dir)["settings"]
    return DataConfig(corpus=s["corpus"], text_field=s["text_field"], val_fraction=s["val_fraction"], dir=str(data_dir),
                      tokenizer={"vocab_size": s["vocab_size"], "min_frequency": s["min_frequency"],
                                 "path": s["tokenizer"]})


def student_config(teacher: ModelConfig, layers: int | None, width: int | None) -> ModelConfig:
    update: dict = {"n_layer": layers if layers is not None else max(1, teacher.n_layer // 2)}
    if width is not None and width != teacher.d_model:
        # A narrower student: heads of d_model / n_head, the family's default MLP width.
        update.update(d_model=width, head_dim=None, d_ff=None)
    try:
        return ModelConfig.model_validate({**teacher.model_dump(), **update})
    except ValidationError as e:
        raise LmforgeError(describe_validation_error(e, "student configuration (--student-layers/--student-width)")) \
            from None


def train_recipe(model: ModelConfig, data: DataConfig, steps: int, seed: int, out: Path, name: str,
                 batch_size: int | None, lr: float | None, like_distill: bool = False) -> Recipe:
    """The quickstart recipe's training settings for `steps` steps, for `model`, evaluating and
    checkpointing only at the end. The warmup is shortened the way `lmforge quickstart` does; with
    `like_distill`, warmup and weight decay are instead those of the distill loop (warmup steps/20,
    decay 0.01), so that a student trained this way differs from a distilled one only in its loss."""
    recipe = load_recipe("quickstart", {"run": {"out": str(out), "name": name}})
    recipe.model = model
    recipe.data = data
    t = recipe.train
    t.max_steps, t.seed, t.device = steps, seed, "cpu"
    t.dtype = "float32"  # as `lmforge distill` trains (auto would be bf16 on an AVX512-BF16 CPU)
    if like_distill:
        t.warmup, t.weight_decay = max(1, steps // 20), 0.01
    else:
        t.warmup = min(t.warmup, steps // 10)
    t.checkpoint_every, t.keep_checkpoints = steps, 1
    if batch_size is not None:
        t.batch_size = batch_size
    if lr is not None:
        t.lr = lr
    recipe.eval.every, recipe.eval.batches = steps, 8
    return recipe


def fresh_run(recipe: Recipe, log):
    """Train a recipe in a run directory of its own (a previous one of this benchmark is replaced)."""
    from lmforge.train.trainer import train

    if recipe.run.dir.exists():
        shutil.rmtree(recipe.run.dir)
    start = time.perf_counter()
    result = train(recipe, progress=False, log=lambda s: log(f"   {s}"))
    return result.model_dir, time.perf_counter() - start


def perplexity(model, data_dir: Path) -> tuple[float, float, int]:
    """(perplexity, loss in nats/token, tokens) on the whole validation split."""
    from lmforge.data.loader import TokenSplit
    from lmforge.eval.perplexity import evaluate_split

    r = evaluate_split(model, TokenSplit(data_dir, "val"), batch_size=8)
    return r.perplexity, r.loss, r.tokens


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/distill-gap"),
                    help="working directory: data, run directories, model directories (its teacher/ and "
                         "student-scratch/ runs are replaced)")
    ap.add_argument("--data", type=Path, default=None,
                    help="a prepared data directory (default: shakespeare, vocabulary 2048, prepared under --out)")
    ap.add_argument("--teacher", type=Path, default=None, help="an existing teacher model directory (skips step 1)")
    ap.add_argument("--teacher-steps", type=int, default=240)
    ap.add_argument("--steps", type=int, default=240, help="steps of each student (scratch and distilled)")
    ap.add_argument("--student-layers", type=int, default=None, help="default: half the teacher's layers")
    ap.add_argument("--student-width", type=int, default=None, help="default: the teacher's d_model")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the quickstart recipe's (32)")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate of both students (default: the quickstart recipe's, 4e-3)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=DistillConfig().alpha, help="weight of the KL term (1 - alpha: cross-entropy)")
    ap.add_argument("--top-k", type=int, default=0, help="teacher logits kept per position (0: all)")
    ap.add_argument("--hidden-weight", type=float, default=DistillConfig().hidden_weight,
                    help="weight of the hidden-state term (0: logits only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", action="store_true",
                    help="also train the student through the distill loop with alpha 0 and hidden weight 0 "
                         "(cross-entropy only)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 30 teacher steps, 20 student steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (use 1 on a shared machine)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.steps = 30, 20
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps <= 0 or args.teacher_steps <= 0:
        raise LmforgeError("--steps and --teacher-steps must be positive")

    import lmforge
    from lmforge.compress.distill import distill
    from lmforge.data.prepare import prepare
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.model import Transformer
    from lmforge.model_dir import save_model_dir

    wall = time.perf_counter()
    out: Path = args.out
    log = print
    print(f"# distill_gap  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {machine()}")
    print(f"# command: python benchmarks/distill_gap.py {shlex.join(sys.argv[1:] if argv is None else argv)}")

    # Data: the quickstart recipe's corpus and vocabulary, unless given.
    if args.data is None:
        base = load_recipe("quickstart", {})
        args.data = prepare(base.data, out / "data" / f"{base.data.corpus}-{base.data.tokenizer.vocab_size}",
                            progress=lambda s: log(f"data: {s}"))
    data = data_config(args.data)
    vocab = TextTokenizer.load(args.data).vocab_size

    # 1. The teacher.
    teacher_seconds = 0.0
    if args.teacher is None:
        cfg = load_recipe("quickstart", {}).model.model_copy(update={"vocab_size": vocab})
        recipe = train_recipe(cfg, data, args.teacher_steps, args.seed, out, "teacher", args.batch_size, args.lr)
        log(f"1. teacher: quickstart recipe, {args.teacher_steps} steps")
        teacher_dir, teacher_seconds = fresh_run(recipe, log)
    else:
        teacher_dir = args.teacher
        log(f"1. teacher: {teacher_dir}")
    teacher = lmforge.load(teacher_dir)
    if teacher.tokenizer.backend.get_vocab() != TextTokenizer.load(args.data).backend.get_vocab():
        raise LmforgeError(f"{args.data} was not tokenized with the teacher's tokenizer: pass the --data the teacher "
                           "was trained on")

    # 2. The student from scratch, by the trainer.
    s_cfg = student_config(teacher.config, args.student_layers, args.student_width)
    recipe = train_recipe(s_cfg, data, args.steps, args.seed, out, "student-scratch", args.batch_size, args.lr,
                          like_distill=True)
    tc = recipe.train
    log(f"2. scratch student: {s_cfg.n_layer} layers x {s_cfg.d_model}, {args.steps} steps by the trainer")
    scratch_dir, scratch_seconds = fresh_run(recipe, log)

    # 3. The same student, distilled: same initial weights, same batches, same peak learning rate.
    d_cfg = DistillConfig(steps=args.steps, batch_size=tc.batch_size, seq_len=s_cfg.context, lr=tc.lr,
                          temperature=args.temperature, alpha=args.alpha, top_k=args.top_k,
                          hidden_weight=args.hidden_weight, seed=args.seed)

    def distilled(cfg: DistillConfig, name: str):
        torch.manual_seed(args.seed)  # as the trainer seeds before building its model
        student = Transformer(s_cfg)
        r = distill(teacher.model, student, args.data, cfg, log=lambda s: log(f"   {s}"))
        record = {"teacher": str(teacher_dir), "steps": cfg.steps, "temperature": cfg.temperature,
                  "alpha": cfg.alpha, "top_k": cfg.top_k, "hidden_weight": cfg.hidden_weight, "lr": cfg.lr}
        save_model_dir(student, teacher.tokenizer, out / name, {"parents": [str(teacher_dir)], "distillation": record})
        return student, r.seconds

    log(f"3. distilled student: same shape and start, {args.steps} steps by the distill loop "
        f"(T={args.temperature}, alpha={args.alpha}, top-k={args.top_k or 'all'}, hidden weight {args.hidden_weight})")
    student, distill_seconds = distilled(d_cfg, "student-distilled")
    control = None
    if args.control:
        log("   control: the distill loop with alpha 0, hidden weight 0 (cross-entropy only)")
        control, _ = distilled(d_cfg.model_copy(update={"alpha": 0.0, "hidden_weight": 0.0}),
                               "student-control")

    # 4. One evaluation for all.
    log("4. validation perplexity (whole validation split)")
    rows = {"teacher": perplexity(teacher.model, args.data),
            "student, scratch": perplexity(lmforge.load(scratch_dir).model, args.data),
            "student, distilled": perplexity(student, args.data)}
    if control is not None:
        rows["student, distill loop alpha 0"] = perplexity(control, args.data)

    t_params, s_params = teacher.model.num_params(), student.num_params()
    print()
    print("settings:")
    print(f"  data         {args.data} ({data.corpus}, vocabulary {vocab}); validation {rows['teacher'][2]:,} tokens")
    print(f"  teacher      {teacher.config.n_layer} layers x {teacher.config.d_model}, {t_params / 1e6:.2f}M params, "
          + (f"{args.teacher_steps} steps" if args.teacher is None else f"from {teacher_dir}"))
    print(f"  student      {s_cfg.n_layer} layers x {s_cfg.d_model}, {s_params / 1e6:.2f}M params, {args.steps} steps "
          f"of {tc.batch_size}x{s_cfg.context} tokens, peak lr {tc.lr:g}, seed {args.seed}")
    print(f"  scratch      trainer: cosine to {tc.min_lr_ratio:g}x, warmup {tc.warmup}, "
          f"weight decay {tc.weight_decay:g} (matrices), clip {tc.grad_clip:g}; loss = CE")
    print(f"  distilled    the Run, distill.train_config: cosine to 0.1x, warmup {max(1, args.steps // 20)}, "
          f"weight decay 0.01 (matrices), clip 1; loss = {args.alpha:g} * T^2 * KL + {1 - args.alpha:g} * CE "
          f"+ {args.hidden_weight:g} * hidden-state MSE, "
          f"T = {args.temperature:g}, top-k {args.top_k or 'all'}")
    print()
    print(f"{'model':32s} {'perplexity':>11s} {'loss (nats)':>12s}")
    for name, (ppl, loss, _) in rows.items():
        print(f"{name:32s} {ppl:11.3f} {loss:12.4f}")
    ppl_t, ppl_s, ppl_d = rows["teacher"][0], rows["student, scratch"][0], rows["student, distilled"][0]
    gap = ppl_s - ppl_t
    closed = (ppl_s - ppl_d) / gap if gap > 0 else None
    print()
    if closed is None:
        print(f"no gap to close: the teacher ({ppl_t:.3f}) is not better than the scratch student ({ppl_s:.3f}); "
              "train the teacher longer (--teacher-steps)")
        met = False
    else:
        met = closed >= TARGET
        print(f"gap closed = ({ppl_s:.3f} - {ppl_d:.3f}) / ({ppl_s:.3f} - {ppl_t:.3f}) = {closed:.3f}")
        print(f"{'met   ' if met else 'MISSED'} distilled student closes >= {TARGET:g} of the gap")
    if control is not None:
        ppl_c = rows["student, distill loop alpha 0"][0]
        if ppl_c > ppl_t:
            print(f"against the alpha-0 control instead of the trainer's student: ({ppl_c:.3f} - {ppl_d:.3f}) / "
                  f"({ppl_c:.3f} - {ppl_t:.3f}) = {(ppl_c - ppl_d) / (ppl_c - ppl_t):.3f}")
    print(f"time: teacher {teacher_seconds:.0f} s, scratch {scratch_seconds:.0f} s, distill {distill_seconds:.0f} s, "
          f"total {time.perf_counter() - wall:.0f} s")
    record = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "perplexity": {k: v[0] for k, v in rows.items()}, "loss": {k: v[1] for k, v in rows.items()},
              "gap_closed": closed, "target": TARGET, "met": met,
              "seconds": {"teacher": teacher_seconds, "scratch": scratch_seconds, "distill": distill_seconds}}
    if args.json:
        write_json(args.json, record)
    return record


if __name__ == "__main__":
    try:
        main()
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
