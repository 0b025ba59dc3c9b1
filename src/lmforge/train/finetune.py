"""`lmforge finetune`: adapt a pretrained model, or pretrain an encoder, on the one loop.

    load the base (or build an encoder) -> full | lora | qlora -> the task's data ->
    the loop (`train.run`) -> model/ or adapter/

A task (`train/sft.py`, `dpo.py`, `classify.py`, `mlm.py`, `embed.py`) knows its data, its loss and its
evaluation; the loop, the optimizer and schedule, the metrics log, checkpoints and resume, the
loss plot and the run directory are those of every training run (`train.run.Run`):

    runs/<name>/
      recipe.yaml      the resolved fine-tuning config (`lmforge finetune runs/<name>/recipe.yaml --resume`)
      metrics.jsonl    step, loss, lr, grad norm; val_loss and the task's metrics per evaluation
      checkpoints/step-000100/{trainable.safetensors, trainer.pt, checksums.sha256}   what trains,
                       optimizer, RNG, step, early-stopping state; the sha256 of each file
      latest -> checkpoints/step-000100
      best -> checkpoints/step-000050   the lowest validation loss (with train.early_stop_patience)
      model/           full fine-tuning: a model directory (+ head.json/head.safetensors for task heads)
      adapter/         lora, qlora: a PEFT adapter directory (+ the task head)
      plots/loss.png
      summary.json     compute (FLOPs, energy) and why the run stopped, as pretraining writes it

Batches are drawn by step number from a seeded order, so a resumed run sees the batches an
uninterrupted one would. Under torchrun (`--nproc N`) each process trains on its rows of every
batch with DDP, and rank 0 writes the run directory (`train.distributed`, docs/finetune.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn as nn
import yaml
from pydantic import model_validator

from lmforge.config import (
    EvalConfig, ModelConfig, RunSection, Section, TrainConfig, load_config,
)
from lmforge.model.lora import LoraSettings
from lmforge.train.distributed import BatchShare
from lmforge.train.embed import EmbedSettings
from lmforge.train.grpo_settings import GrpoSettings
from lmforge.train.run import Run, TaskStep, check_run_dir, stop_record
from lmforge.train.run import Task as LoopTask

TASKS = ("sft", "dpo", "grpo", "classify", "tag", "mlm", "embed")


class QloraSettings(Section):
    """The frozen base's block linears stored as int8 (per channel) or int4 (groups), via lmforge.compress."""

    bits: Literal[4, 8] = 4
    group_size: int = 32


class DpoSettings(Section):
    beta: float = 0.1  # strength of the pull toward the reference model


class MlmSettings(Section):
    mask_prob: float = 0.15  # of the tokens, chosen for prediction; of those 80% [mask], 10% random, 10% kept

    @model_validator(mode="after")
    def _check(self) -> "MlmSettings":
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError("mask_prob must be in (0, 1)")
        return self


class FinetuneData(Section):
    train: str | None = None  # JSONL (sft, dpo, grpo, classify, tag, embed), or text / a prepared directory (mlm)
    val: str | None = None  # None: hold out val_fraction of train
    val_fraction: float = 0.1
    pack: bool = False  # sft: pack several examples per row (attention kept within each)
    on_long: Literal["truncate", "error"] = "truncate"
    labels: list[str] | None = None  # classify/tag: the label set (None: the labels seen in train, sorted)
    text_field: str = "text"
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"


def _finetune_train_defaults() -> TrainConfig:
    return TrainConfig(batch_size=8, lr=1e-4, warmup=10, max_steps=200, weight_decay=0.0, checkpoint_every=100,
                       log_every=10, schedule="cosine")


class FinetuneConfig(Section):
    base: str | None = None  # the model directory to adapt
    model: ModelConfig | None = None  # mlm only: the encoder to build from scratch (vocab from the data)
    task: Literal["sft", "dpo", "grpo", "classify", "tag", "mlm", "embed"] = "sft"
    method: Literal["full", "lora", "qlora"] = "full"
    lora: LoraSettings = LoraSettings()
    qlora: QloraSettings = QloraSettings()
    dpo: DpoSettings = DpoSettings()
    grpo: GrpoSettings = GrpoSettings()  # task grpo: rollouts, rewards, the clipped loss (train/grpo.py)
    mlm: MlmSettings = MlmSettings()
    embed: EmbedSettings = EmbedSettings()  # task embed: pooling, temperature, matryoshka (train/embed.py)
    data: FinetuneData = FinetuneData()
    train: TrainConfig = _finetune_train_defaults()
    eval: EvalConfig = EvalConfig(every=50, batches=20)
    run: RunSection = RunSection(name="finetune")

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if self.data.train is None:
            raise ValueError("data.train is required (--data FILE)")
        if (self.base is None) == (self.model is None):
            raise ValueError("give either base (a model directory to adapt) or model (an encoder built from "
                             "scratch, task mlm)")
        if self.model is not None and self.task != "mlm":
            raise ValueError("only task mlm builds a model from scratch; other tasks adapt a base model")
        if self.model is not None and self.method != "full":
            raise ValueError("a model built from scratch trains in full (method: full)")
        if self.train.init_from is not None:
            raise ValueError("train.init_from is for pretraining; fine-tuning names its model in base")
        if self.train.parallel in ("fsdp", "tp", "fsdp+tp", "pp", "fsdp+pp"):
            splits = "pipelines" if self.train.parallel.endswith("pp") else "shards"
            raise ValueError(f"train.parallel {self.train.parallel} {splits} pretraining only; fine-tuning under "
                             "torchrun trains data-parallel: use ddp (or auto)")
        if self.train.loss_chunk and self.task != "sft":
            raise ValueError(f"train.loss_chunk applies to pretraining and task sft; task {self.task} computes "
                             "its own loss (leave it 0)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "finetune"


def builtin_finetune_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES.glob("*.yaml"))}


def load_finetune_config(source: str | Path | None, overrides: list[str] | dict | None = None) -> FinetuneConfig:
    """A fine-tuning config from YAML (a path or a built-in recipe name, e.g. `lora-sft`) plus
    overrides. Data paths relative to the YAML file are found beside it (the built-in samples)."""
    return load_config(FinetuneConfig, source, overrides, kind="fine-tuning config",
                       builtins=builtin_finetune_recipes(), accepts="a model directory, a YAML file",
                       beside=_data_beside)


def _data_beside(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    data = raw.get("data")
    for key in ("train", "val"):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute() and not Path(value).exists() \
                and (path.parent / value).exists():
            data[key] = str(path.parent / value)
    return raw


# ----------------------------------------------------------------------------- tasks

class Task(LoopTask, Protocol):
    """A fine-tuning task: the loop's (`train.run.Task`, with batches as dicts of tensors and
    evaluation as a dict of metrics with val_loss), and what the saved model needs to know."""

    head: nn.Module | None  # trained with the model (task heads); None for language-model tasks
    task_type: str  # PEFT's name for it: CAUSAL_LM, SEQ_CLS, TOKEN_CLS, FEATURE_EXTRACTION

    def head_record(self) -> dict[str, Any]: ...  # what head.json says (labels), {} without a head


def make_task(cfg: FinetuneConfig, loaded, device: torch.device, log, share: BatchShare | None = None) -> Task:
    """The task of `cfg`, drawing `share` of each global batch (this process's rows under torchrun)."""
    if cfg.task == "sft":
        from lmforge.train.sft import SFTTask

        return SFTTask(cfg, loaded, device, log, share)
    if cfg.task == "dpo":
        from lmforge.train.dpo import DPOTask

        return DPOTask(cfg, loaded, device, log, share)
    if cfg.task == "grpo":
        from lmforge.train.grpo import GrpoTask

        return GrpoTask(cfg, loaded, device, log, share)
    if cfg.task in ("classify", "tag"):
        from lmforge.train.classify import ClassifyTask, TagTask

        return (ClassifyTask if cfg.task == "classify" else TagTask)(cfg, loaded, device, log, share)
    if cfg.task == "embed":
        from lmforge.train.embed import EmbedTask

        return EmbedTask(cfg, loaded, device, log, share)
    from lmforge.train.mlm import MLMTask

    return MLMTask(cfg, loaded, device, log, share)


# ----------------------------------------------------------------------------- the model

def prepare_model(cfg: FinetuneConfig, device: torch.device, log):
    """The base (or a new encoder) as a LoadedModel, with LoRA/QLoRA applied as configured."""
    from lmforge.adapters import apply_lora
    from lmforge.loaded import LoadedModel
    from lmforge.model.lora import trainable_parameters

    if cfg.base is not None:
        import lmforge

        loaded = lmforge.load(cfg.base)
    else:
        from lmforge.train.mlm import new_encoder

        loaded = new_encoder(cfg, log)
    model = loaded.model
    if cfg.method == "qlora":
        before = model_bytes(model)
        quantize_base(model, cfg.qlora)
        loaded.meta = {**loaded.meta, "qlora_bytes": {"before": before, "after": model_bytes(model)}}
        log(f"qlora: base stored as int{cfg.qlora.bits}: {before / 2**20:.1f} MiB -> {model_bytes(model) / 2**20:.1f} MiB")
    if cfg.method in ("lora", "qlora"):
        apply_lora(model, cfg.lora)
    model.to(device)
    trainable, total = trainable_parameters(model)
    log(f"{cfg.method}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")
    return LoadedModel(model, loaded.tokenizer, loaded.path, loaded.meta)


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, shared tensors once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def quantize_base(model: nn.Module, q: QloraSettings) -> None:
    """Every block linear of the frozen base becomes an int8/int4 `QuantizedLinear` (lmforge.compress)."""
    from lmforge.compress.qlinear import QuantizedLinear, check_group_size
    from lmforge.compress.storage import set_module
    from lmforge.model.lora import BLOCK_LINEARS

    for i in range(len(model.blocks)):
        for part in BLOCK_LINEARS:
            name = f"blocks.{i}.{part}"
            linear = model.get_submodule(name)
            if q.bits == 4:
                check_group_size(linear.in_features, q.group_size, name)
            with torch.no_grad():
                set_module(model, name, QuantizedLinear.from_float(linear, q.bits, q.group_size))


# ----------------------------------------------------------------------------- the loop

@dataclass
class FinetuneResult:
    run_dir: Path
    output: Path  # model/ or adapter/
    steps: int
    seconds: float
    train_loss: float
    metrics: dict[str, float]


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True, log=print,
             interrupt_at: int | None = None, resume_from: str | None = None) -> FinetuneResult:
    """Run a fine-tuning config. `resume` continues from the newest intact checkpoint, `resume_from`
    (`step-N` or a checkpoint path) from that one. `interrupt_at` stops as a signal would at that
    step (for tests)."""
    resume = resume or resume_from is not None
    check_run_dir(cfg.run.dir, resume, resume_from)
    with Run.open(cfg.train, cfg.run.dir, eval_every=cfg.eval.every, log=log, progress=progress,
                  interrupt_at=interrupt_at) as run:
        return _finetune(cfg, run, resume, resume_from)


def _finetune(cfg: FinetuneConfig, run: Run, resume: bool, resume_from: str | None) -> FinetuneResult:
    from lmforge.eval.compute import EnergyMeter, write_run_summary
    from lmforge.train.checkpoint import TrainableCheckpoints
    from lmforge.train.metrics import plot_losses

    run_dir, tc, ctx, device, log = cfg.run.dir, cfg.train, run.ctx, run.device, run.log
    if cfg.task == "mlm" and ctx.is_main:  # one process prepares the text; the others then find it ready
        from lmforge.train.mlm import data_dir

        data_dir(cfg, str(cfg.base) if cfg.base else None)
    ctx.barrier()
    torch.manual_seed(tc.seed)
    loaded = prepare_model(cfg, device, log)
    model = loaded.model
    task = make_task(cfg, loaded, device, log, BatchShare(ctx))
    head = task.head.to(device) if task.head is not None else None
    # Under DDP the model with its head and loss is what is wrapped. A task head reads the backbone's
    # hidden states, so a language-model head that trains (full, untied) gets no gradient.
    # With activation checkpointing, blocks are recomputed.
    lm_head = model.lm_head.weight
    unused_lm_head = (head is not None or cfg.task == "embed") and lm_head.requires_grad \
        and lm_head is not model.tok_emb.weight
    run.parallelize(model, TaskStep(task, model, head), partly_used=unused_lm_head)
    model.train()
    run.prepare(nn.ModuleList([model] + ([head] if head is not None else [])))
    run.start(cfg.to_yaml(), TrainableCheckpoints(run_dir, model, head, tc.keep_checkpoints, ctx), resume,
              resume_from)

    flops_per_token = training_flops_per_token(model.config)
    energy = EnergyMeter(device)
    end = run.fit(task, model, label=cfg.task)
    provenance = {"finetune": cfg.model_dump(mode="json"),
                  "metrics": {**end.val, "train_loss": end.train_loss, "steps": end.steps, "seconds": end.seconds}}
    output = run_dir / ("model" if cfg.method == "full" else "adapter")
    if ctx.is_main:  # every process holds the same trained tensors
        output = save_outputs(cfg, loaded, task, head, run_dir, provenance)
        plot_losses(run_dir)
        write_run_summary(run_dir, flops_per_token, end.tokens, end.steps, end.seconds, device, energy,
                          end.seconds - run.elapsed_before, ctx.world,
                          extra={"task": cfg.task, "method": cfg.method, **stop_record(end, run_dir)})
    ctx.barrier()
    return FinetuneResult(run_dir, output, end.steps, end.seconds, end.train_loss, end.val)


def training_flops_per_token(config: ModelConfig) -> float:
    """The model's training FLOPs per token (6 per weight plus attention, as pretraining counts),
    from its config: a QLoRA base holds its linears as integers, which the module count would miss.
    LoRA's frozen weights take no weight gradients, so for lora and qlora this is an upper bound."""
    from lmforge.model import Transformer

    with torch.device("meta"):
        return Transformer(config).flops_per_token(training=True)


def save_outputs(cfg: FinetuneConfig, loaded, task: Task, head, run_dir: Path, provenance: dict[str, Any]) -> Path:
    """adapter/ (lora, qlora) or model/ (full), each with the task head beside it when there is one."""
    import copy
    import json

    from safetensors.torch import save_file

    from lmforge.adapters import save_adapter
    from lmforge.model_dir import save_model_dir

    model = loaded.model
    head_tensors = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()} if head else None
    if cfg.method in ("lora", "qlora"):
        out = save_adapter(model, run_dir / "adapter", str(cfg.base), loaded.meta, extra=head_tensors,
                           provenance=provenance, task_type=task.task_type)
    else:
        cpu = copy.deepcopy(model).cpu().float()
        parents = [str(cfg.base)] if cfg.base else []
        out = save_model_dir(cpu, loaded.tokenizer, run_dir / "model", {"parents": parents, **provenance})
        if head_tensors:
            save_file(head_tensors, str(out / "head.safetensors"))
    if head is not None:
        (out / "head.json").write_text(json.dumps({"task": cfg.task, **task.head_record()}, indent=2))
    for name, text in getattr(task, "output_files", dict)().items():  # what serving reads (embedding.json)
        (out / name).write_text(text)
    return out
