"""Embedding models: a backbone's pooled, L2-normalised hidden states, and the contrastive
fine-tune that makes them good at retrieval (`lmforge finetune --task embed`).

    {"query": "How do I resume a run?", "positive": "Pass --resume ...", "negative": "..."}   (negative optional)

The loss is InfoNCE: each query's positive must score above every other positive of the batch
(in-batch negatives) and every hard negative of the batch, scores being cosine similarities
divided by `embed.temperature`. Under torchrun each process embeds its rows and the
positives and negatives of all processes are gathered (with their gradients), so the
negatives are those of the whole global batch, as on one process. With `embed.matryoshka`
dimensions the loss is also taken on the embeddings truncated to each of them, so that a
client may ask for shorter vectors (`dimensions` in /v1/embeddings).

Each evaluation reports retrieval on the held-out pairs: every held-out query against all
held-out positives and negatives, recall@1 and MRR of its positive (before training too).
What serving needs, the pooling and the dimensions, is saved as `embedding.json` beside the
model (or adapter); a model directory without it is embedded with mean pooling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import model_validator

from lmforge.config import Section
from lmforge.data.sft import EpochBatches, chunks, read_jsonl, split_validation
from lmforge.errors import LmforgeError
from lmforge.model.pooling import POOLINGS, pool
from lmforge.train.distributed import BatchShare

EMBEDDING_FILE = "embedding.json"


class EmbedSettings(Section):
    pooling: Literal["mean", "last", "cls"] = "mean"  # saved with the model: serving pools the same way
    temperature: float = 0.05  # scores are cosine / temperature
    matryoshka: list[int] = []  # shorter dimensions also trained (and then allowed as `dimensions`)
    query_field: str = "query"
    positive_field: str = "positive"
    negative_field: str = "negative"  # optional per record: a hard negative

    @model_validator(mode="after")
    def _check(self) -> "EmbedSettings":
        if not self.temperature > 0:
            raise ValueError("embed.temperature must be more than 0")
        if any(d < 1 for d in self.matryoshka):
            raise ValueError("embed.matryoshka dimensions must be at least 1")
        return self


# ----------------------------------------------------------------------------- embedding

def embedding_record(folder: str | Path | None) -> dict[str, Any]:
    """What `embedding.json` in `folder` says (pooling, dimensions), or {} when there is none."""
    path = Path(folder) / EMBEDDING_FILE if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LmforgeError(f"{path} is not valid JSON ({e}); re-save it or remove it") from None
    if not isinstance(record, dict) or record.get("pooling", "mean") not in POOLINGS:
        raise LmforgeError(f"{path}: pooling must be one of {', '.join(POOLINGS)}")
    return record


def embed_batch(model, input_ids: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """Unit-length embeddings (B, d_model) of right-padded rows."""
    from lmforge.train.classify import backbone_hidden

    return F.normalize(pool(backbone_hidden(model, input_ids, lengths), lengths, pooling).float(), dim=-1)


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        x[i, :len(ids)] = torch.tensor(ids)
    return x, torch.tensor([len(ids) for ids in rows])


class Embedder:
    """Embeddings of texts or token ids with a model's pooling (`embedding.json`, else mean):
    `Embedder.of(lmforge.load(path)).embed(["..."])`. `dimensions`: the lengths a vector may be
    truncated to (the model's own, and those trained with embed.matryoshka)."""

    def __init__(self, model, tokenizer, pooling: str = "mean", dimensions: list[int] | None = None):
        if pooling not in POOLINGS:
            raise LmforgeError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.size = model.config.d_model
        self.dimensions = sorted({self.size, *(d for d in dimensions or [] if d < self.size)})
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    @classmethod
    def of(cls, loaded, record_dir: str | Path | None = None) -> "Embedder":
        """The embedder of a loaded model, with the pooling saved in `record_dir` (default: its directory)."""
        record = embedding_record(record_dir if record_dir is not None else loaded.path)
        return cls(loaded.model, loaded.tokenizer, record.get("pooling", "mean"), record.get("dimensions"))

    @torch.no_grad()
    def embed_ids(self, rows: list[list[int]], batch_size: int = 32, dimensions: int | None = None) -> torch.Tensor:
        """(len(rows), dimensions or d_model) float32 unit vectors. Rows are batched by length (less
        padding); each row's vector does not depend on what it is batched with, up to rounding."""
        if dimensions is not None and dimensions not in self.dimensions:
            raise LmforgeError(f"this model's embeddings may be {', '.join(map(str, self.dimensions))} long, "
                               f"not {dimensions}")
        device = next(self.model.parameters()).device
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = torch.empty(len(rows), self.size)
        for part in chunks(order, batch_size):
            x, n = pad_rows([rows[i] for i in part], self.pad_id)
            out[part] = embed_batch(self.model, x.to(device), n.to(device), self.pooling).cpu()
        return truncate(out, dimensions)

    def embed(self, texts: list[str], batch_size: int = 32, dimensions: int | None = None) -> torch.Tensor:
        """Texts longer than the context keep their start."""
        context = self.model.config.context
        rows = [(ids or [self.pad_id])[:context] for ids in self.tokenizer.encode_batch(texts)]
        return self.embed_ids(rows, batch_size, dimensions)


def truncate(vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """The first `dimensions` of each unit vector, unit-length again."""
    if dimensions is None or dimensions == vectors.shape[-1]:
        return vectors
    return F.normalize(vectors[..., :dimensions], dim=-1)


def retrieval_metrics(queries: torch.Tensor, corpus: torch.Tensor, gold: list[int]) -> dict[str, float]:
    """recall@1 and MRR of each query's gold row of `corpus` (cosine scores; ties count against it)."""
    scores = queries @ corpus.T
    own = scores[torch.arange(len(gold)), torch.tensor(gold)]
    ranks = (scores >= own[:, None]).sum(1).float()  # 1 when the gold row alone scores highest
    return {"recall_at_1": float((ranks == 1).float().mean()), "mrr": float((1 / ranks).mean())}


# ----------------------------------------------------------------------------- the task

class _GatherWithGradient(torch.autograd.Function):
    """All processes' (B, ...) tensors, stacked in rank order; the gradient of each process's
    own part is the sum of the gradients every process's loss gives it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous(), group=_own_group())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=_own_group())
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


_GROUPS: dict[int, Any] = {}


def _own_group():
    """A process group of its own for the gathers (one per default group): the backward's
    all-reduce runs while DDP's bucket all-reduces are in flight on the default group, and the
    collectives of one group must be issued in the same order on every process, which the two
    interleaved need not be (seen: one process finishing a collective short, then exiting)."""
    world = id(dist.group.WORLD)
    if world not in _GROUPS:
        _GROUPS[world] = dist.new_group()
    return _GROUPS[world]


def gather(x: torch.Tensor, share: BatchShare) -> torch.Tensor:
    return _GatherWithGradient.apply(x) if share.ctx.active else x


def gather_flags(x: torch.Tensor, share: BatchShare) -> torch.Tensor:
    if not share.ctx.active:
        return x
    parts = [torch.empty_like(x) for _ in range(share.ctx.world)]
    dist.all_gather(parts, x.contiguous(), group=_own_group())
    return torch.cat(parts)


class EmbedTask:
    """InfoNCE over (query, positive, hard negatives) pairs; see the module docstring."""

    task_type = "FEATURE_EXTRACTION"
    head = None

    def __init__(self, cfg, loaded, device, log, share: BatchShare | None = None):
        self.share = share or BatchShare()
        s: EmbedSettings = cfg.embed
        self.settings, self.tokenizer, self.context = s, loaded.tokenizer, loaded.config.context
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        self.batch_size, self.eval_batches, self.on_long = cfg.train.batch_size, cfg.eval.batches, cfg.data.on_long
        too_big = [d for d in s.matryoshka if d >= loaded.config.d_model]
        if too_big:
            raise LmforgeError(f"embed.matryoshka {too_big} must be below the model's width {loaded.config.d_model}")
        self.truncated = 0
        train = read_jsonl(cfg.data.train)
        val = read_jsonl(cfg.data.val) if cfg.data.val else None
        if val is None:
            train, val = split_validation(train, cfg.data.val_fraction, cfg.train.seed)
        self.rows = [self._encode(o, line, Path(cfg.data.train)) for line, o in train]
        self.val_rows = [self._encode(o, line, Path(cfg.data.val or cfg.data.train)) for line, o in val]
        if len(self.rows) < 2:
            raise LmforgeError("contrastive training needs at least two pairs (the other pairs are the negatives)")
        self.with_negatives = any(r[2] for r in self.rows)
        self.batches = EpochBatches(self.rows, cfg.train.batch_size, cfg.train.seed)
        longest = max(len(ids) for r in self.rows for ids in [r[0], r[1], *r[2]])
        self.tokens_per_batch = cfg.train.batch_size * longest * (3 if self.with_negatives else 2)
        negatives = sum(len(r[2]) for r in self.rows)
        log(f"embed: {len(self.rows)} train pairs ({negatives} hard negatives), {len(self.val_rows)} held out; "
            f"pooling {s.pooling}, temperature {s.temperature:g}"
            + (f"; {self.truncated} texts truncated to the context" if self.truncated else ""))
        self.before = self._evaluate_untouched(loaded.model)
        self.last: dict[str, float] = {}
        if self.before:
            log(f"embed: held-out retrieval before training: recall@1 {self.before['recall_at_1']:.3f}, "
                f"MRR {self.before['mrr']:.3f}")

    # -- data

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text) or [self.pad_id]
        if len(ids) > self.context:
            if self.on_long == "error":
                raise LmforgeError(f"a text of {len(ids)} tokens is longer than the context of {self.context}; "
                                   "shorten it or use --data.on_long truncate")
            self.truncated += 1
            ids = ids[:self.context]
        return ids

    def _encode(self, obj: dict[str, Any], line: int, path: Path):
        s = self.settings
        texts = []
        for key in (s.query_field, s.positive_field):
            value = obj.get(key)
            if not isinstance(value, str) or not value.strip():
                raise LmforgeError(f"{path} line {line}: expected a non-empty string field {key!r}")
            texts.append(value)
        negative = obj.get(s.negative_field)
        if negative is not None and not (isinstance(negative, str) and negative.strip()):
            raise LmforgeError(f"{path} line {line}: {s.negative_field!r}, when given, must be a non-empty string")
        return self._ids(texts[0]), self._ids(texts[1]), [self._ids(negative)] if negative is not None else []

    def _collate(self, rows) -> dict[str, torch.Tensor]:
        q, qn = pad_rows([r[0] for r in rows], self.pad_id)
        p, pn = pad_rows([r[1] for r in rows], self.pad_id)
        b = {"query": q, "query_len": qn, "positive": p, "positive_len": pn}
        if self.with_negatives:  # a row without a hard negative holds a pad there, masked out of the scores
            n, nn_ = pad_rows([r[2][0] if r[2] else [self.pad_id] for r in rows], self.pad_id)
            b.update(negative=n, negative_len=nn_, has_negative=torch.tensor([int(bool(r[2])) for r in rows]))
        return b

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        # Every row averages one query's loss: the processes' equal shares need no weights.
        return self.share.rows(self._collate(self.batches.batch(index)))

    # -- the loss

    def _embed(self, model, b, name: str) -> torch.Tensor:
        return embed_batch(model, b[name], b[f"{name}_len"], self.settings.pooling)

    def loss(self, model, b) -> torch.Tensor:
        q = self._embed(model, b, "query")
        keys = [gather(self._embed(model, b, "positive"), self.share)]
        mask = None
        if "negative" in b:
            keys.append(gather(self._embed(model, b, "negative"), self.share))
            has = gather_flags(b["has_negative"], self.share) > 0
            mask = torch.cat([torch.ones_like(has), has])
        k = torch.cat(keys)
        first = self.share.ctx.rank * q.shape[0] if self.share.ctx.active else 0
        target = torch.arange(first, first + q.shape[0], device=q.device)
        sizes = [None, *self.settings.matryoshka]
        return sum(self._info_nce(truncate(q, d), truncate(k, d), target, mask) for d in sizes) / len(sizes)

    def _info_nce(self, q, k, target, mask) -> torch.Tensor:
        scores = q @ k.T / self.settings.temperature
        if mask is not None:
            scores = scores.masked_fill(~mask[None, :], float("-inf"))
        return F.cross_entropy(scores, target)

    # -- evaluation

    def _evaluate_untouched(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self.evaluate(model)
        finally:
            model.train(was_training)

    def evaluate(self, model) -> dict[str, float]:
        """Validation InfoNCE (in-batch, as training sees it) and retrieval over all held-out pairs."""
        if not self.val_rows:
            return {}
        rows = self.val_rows[:self.eval_batches * self.batch_size]
        embed = Embedder(model, self.tokenizer, self.settings.pooling)
        queries = embed.embed_ids([r[0] for r in rows], self.batch_size)
        corpus = embed.embed_ids([r[1] for r in rows] + [n for r in rows for n in r[2]], self.batch_size)
        losses = []
        for start in range(0, len(rows), self.batch_size):
            q, k = queries[start:start + self.batch_size], corpus[start:start + self.batch_size]
            if len(q) > 1:
                losses.append(F.cross_entropy(q @ k.T / self.settings.temperature, torch.arange(len(q))).item())
        metrics = retrieval_metrics(queries, corpus, list(range(len(rows))))
        self.last = {"val_loss": sum(losses) / max(len(losses), 1), **metrics}
        return self.last

    def head_record(self) -> dict[str, Any]:
        return {}

    def output_files(self) -> dict[str, str]:
        """embedding.json: how serving embeds with this model, and the held-out retrieval figures."""
        record = {"pooling": self.settings.pooling, "normalize": True, "dimensions": sorted(self.settings.matryoshka),
                  "held_out": {"pairs": len(self.val_rows), "before": self.before, "after": self.last}}
        return {EMBEDDING_FILE: json.dumps(record, indent=2)}
