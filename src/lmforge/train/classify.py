"""Transfer learning with task heads: sequence classification and token classification (BIO tags).

    classify: {"text": "a fine film", "label": "positive"}
    tag:      {"tokens": ["Alice", "flew", "to", "New", "York"], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC"]}

The label set is `data.labels`, or the labels seen in the training file (sorted). A label
outside it is an error naming the line. Tagging predicts one label per word, at its last
sub-token on a causal backbone (the first that has seen the whole word) and at its first on
an encoder; its other sub-tokens carry no label. Each evaluation reports loss, accuracy and macro-F1
(classify) or token accuracy and entity-level precision/recall/F1 (tag).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.data.sft import IGNORE, EpochBatches, chunks, read_jsonl, split_validation
from lmforge.data.words import word_texts
from lmforge.errors import LmforgeError
from lmforge.model.heads import SequenceClassifier, TokenClassifier, accuracy, entity_f1, macro_f1
from lmforge.train.distributed import BatchShare, weighted


def _field(obj: dict, key: str, kind: type, path: Path, line: int):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise LmforgeError(f"{path} line {line}: expected a {names} field {key!r}")
    return value


def label_set(cfg, seen: list[str]) -> list[str]:
    labels = list(cfg.data.labels) if cfg.data.labels else sorted(set(seen))
    if len(labels) < 2:
        raise LmforgeError(f"a classifier needs at least two labels; found {labels}")
    return labels


def check_labels(labels: list[str], used: list[tuple[int, str]], path: Path) -> None:
    known = set(labels)
    bad = [(line, label) for line, label in used if label not in known]
    if bad:
        line, label = bad[0]
        raise LmforgeError(f"{path} line {line}: label {label!r} is not in the label set ({', '.join(labels)}); "
                           f"{len(bad)} such label(s) in all")


def backbone_hidden(model, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Hidden states of right-padded rows; an encoder masks the padding (a segment of its own)."""
    if model.config.causal:
        return model.hidden_states(input_ids)
    real = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths[:, None]
    return model.hidden_states(input_ids, segment_ids=real.long())


class _HeadTask:
    def _read(self, cfg, path: str) -> list[tuple[int, dict[str, Any]]]:
        return read_jsonl(path)

    def _splits(self, cfg, log):
        train = self._read(cfg, cfg.data.train)
        val = self._read(cfg, cfg.data.val) if cfg.data.val else None
        if val is None:
            train, val = split_validation(train, cfg.data.val_fraction, cfg.train.seed)
        return train, val

    def head_record(self) -> dict[str, Any]:
        return {"labels": self.labels, "pooling": getattr(self.head, "pooling", None)}


class ClassifyTask(_HeadTask):
    task_type = "SEQ_CLS"

    def __init__(self, cfg, loaded, device, log, share: BatchShare | None = None):
        self.share = share or BatchShare()  # the loss is a mean over texts: this process's rows, unweighted
        tok, self.context = loaded.tokenizer, loaded.config.context
        self.pad_id = tok.pad_id if tok.pad_id is not None else 0
        self.batch_size, self.eval_batches = cfg.train.batch_size, cfg.eval.batches
        train, val = self._splits(cfg, log)
        path = Path(cfg.data.train)
        texts = [(line, _field(o, cfg.data.text_field, str, path, line)) for line, o in train]
        seen = [(line, str(_field(o, cfg.data.label_field, (str, int), path, line))) for line, o in train]
        self.labels = label_set(cfg, [label for _, label in seen])
        check_labels(self.labels, seen, path)
        val_path = Path(cfg.data.val or cfg.data.train)
        val_seen = [(line, str(_field(o, cfg.data.label_field, (str, int), val_path, line))) for line, o in val]
        check_labels(self.labels, val_seen, val_path)
        index = {label: i for i, label in enumerate(self.labels)}
        truncated = [0]

        def encode(text: str) -> list[int]:
            ids = tok.encode(text) or [self.pad_id]
            if len(ids) > self.context:
                if cfg.data.on_long == "error":
                    raise LmforgeError(f"a text of {len(ids)} tokens is longer than the context of {self.context}; "
                                       "shorten it or use --data.on_long truncate")
                truncated[0] += 1
                ids = ids[-self.context:] if loaded.config.causal else ids[:self.context]
            return ids

        self.rows = [(encode(t), index[label]) for (_, t), (_, label) in zip(texts, seen)]
        self.val_rows = [(encode(_field(o, cfg.data.text_field, str, val_path, line)), index[label])
                         for (line, o), (_, label) in zip(val, val_seen)]
        log(f"classify: {len(self.rows)} train, {len(self.val_rows)} validation examples, labels {self.labels}"
            + (f"; {truncated[0]} truncated" if truncated[0] else ""))
        pooling = "last" if loaded.config.causal else "mean"
        self.head = SequenceClassifier(loaded.config.d_model, len(self.labels), pooling)
        self.batches = EpochBatches(self.rows, cfg.train.batch_size, cfg.train.seed)
        self.tokens_per_batch = cfg.train.batch_size * max(len(r[0]) for r in self.rows)

    def _collate(self, rows) -> dict[str, torch.Tensor]:
        T = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            x[i, :len(ids)] = torch.tensor(ids)
        return {"input_ids": x, "lengths": torch.tensor([len(ids) for ids, _ in rows]),
                "labels": torch.tensor([label for _, label in rows])}

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        return self.share.rows(self._collate(self.batches.batch(index)))

    def logits(self, model, b) -> torch.Tensor:
        return self.head(backbone_hidden(model, b["input_ids"], b["lengths"]), b["lengths"]).float()

    def loss(self, model, b) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, b), b["labels"])

    def evaluate(self, model) -> dict[str, float]:
        device = next(model.parameters()).device
        pred, gold, total = [], [], 0.0
        for i, rows in enumerate(chunks(self.val_rows, self.batch_size)):
            if i >= self.eval_batches:
                break
            b = {k: v.to(device) for k, v in self._collate(rows).items()}
            logits = self.logits(model, b)
            total += F.cross_entropy(logits, b["labels"], reduction="sum").item()
            pred += logits.argmax(-1).tolist()
            gold += b["labels"].tolist()
        if not gold:
            return {}
        return {"val_loss": total / len(gold), "accuracy": accuracy(pred, gold),
                "macro_f1": macro_f1(pred, gold, len(self.labels))}


class TagTask(_HeadTask):
    task_type = "TOKEN_CLS"

    def __init__(self, cfg, loaded, device, log, share: BatchShare | None = None):
        self.share = share or BatchShare()
        self.tok, self.context, self.causal = loaded.tokenizer, loaded.config.context, loaded.config.causal
        self.pad_id = self.tok.pad_id if self.tok.pad_id is not None else 0
        self.batch_size, self.eval_batches, self.on_long = cfg.train.batch_size, cfg.eval.batches, cfg.data.on_long
        train, val = self._splits(cfg, log)
        path, val_path = Path(cfg.data.train), Path(cfg.data.val or cfg.data.train)
        train_items = [self._item(cfg, o, line, path) for line, o in train]
        val_items = [self._item(cfg, o, line, val_path) for line, o in val]
        self.labels = label_set(cfg, [t for _, _, tags in train_items for t in tags])
        for items, p in ((train_items, path), (val_items, val_path)):
            check_labels(self.labels, [(line, t) for line, _, tags in items for t in tags], p)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.truncated = 0
        self.rows = [self._encode(words, tags) for _, words, tags in train_items]
        self.val_rows = [self._encode(words, tags) for _, words, tags in val_items]
        log(f"tag: {len(self.rows)} train, {len(self.val_rows)} validation sentences, labels {self.labels}"
            + (f"; {self.truncated} truncated" if self.truncated else ""))
        self.head = TokenClassifier(loaded.config.d_model, len(self.labels))
        self.batches = EpochBatches(self.rows, cfg.train.batch_size, cfg.train.seed)
        self.tokens_per_batch = cfg.train.batch_size * max(len(r[0]) for r in self.rows)

    def _item(self, cfg, obj, line: int, path: Path):
        words = _field(obj, cfg.data.tokens_field, list, path, line)
        tags = _field(obj, cfg.data.tags_field, list, path, line)
        if len(words) != len(tags) or not words:
            raise LmforgeError(f"{path} line {line}: {len(words)} tokens but {len(tags)} tags")
        return line, [str(w) for w in words], [str(t) for t in tags]

    def _encode(self, words: list[str], tags: list[str]):
        """(ids, a label per sub-token (IGNORE but on one per word), the tags of the words kept)."""
        ids, labels, kept = [], [], 0
        for text, tag in zip(word_texts(words), tags):
            piece = self.tok.encode(text) or [self.pad_id]
            if len(ids) + len(piece) > self.context:
                if self.on_long == "error":
                    raise LmforgeError(f"a sentence of {len(words)} words is longer than the context of "
                                       f"{self.context} tokens; shorten it or use --data.on_long truncate")
                self.truncated += 1
                break
            ids += piece
            # A causal backbone has seen the whole word only at its last sub-token; an encoder everywhere.
            rest = [IGNORE] * (len(piece) - 1)
            labels += rest + [self.index[tag]] if self.causal else [self.index[tag]] + rest
            kept += 1
        return ids, labels, tags[:kept]

    def _collate(self, rows) -> dict[str, torch.Tensor]:
        T = max(len(ids) for ids, _, _ in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for i, (ids, labels, _) in enumerate(rows):
            x[i, :len(ids)] = torch.tensor(ids)
            y[i, :len(ids)] = torch.tensor(labels)
        return {"input_ids": x, "labels": y, "lengths": torch.tensor([len(ids) for ids, _, _ in rows])}

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        b = self._collate(self.batches.batch(index))
        return self.share.rows(b, counted=b["labels"] != IGNORE)

    def logits(self, model, b) -> torch.Tensor:
        return self.head(backbone_hidden(model, b["input_ids"], b["lengths"])).float()

    def loss(self, model, b) -> torch.Tensor:
        loss = F.cross_entropy(self.logits(model, b).flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE)
        return weighted(loss, b)

    def evaluate(self, model) -> dict[str, float]:
        device = next(model.parameters()).device
        pred_tags, gold_tags, total, count, correct = [], [], 0.0, 0, 0
        for i, rows in enumerate(chunks(self.val_rows, self.batch_size)):
            if i >= self.eval_batches:
                break
            b = {k: v.to(device) for k, v in self._collate(rows).items()}
            logits = self.logits(model, b)
            y = b["labels"]
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
            pred = logits.argmax(-1)
            keep = y != IGNORE
            count += int(keep.sum())
            correct += int((pred[keep] == y[keep]).sum())
            for r, (_, _, tags) in enumerate(rows):
                pred_tags.append([self.labels[j] for j in pred[r][keep[r]].tolist()])
                gold_tags.append(tags)
        if not count:
            return {}
        return {"val_loss": total / count, "accuracy": correct / count, **entity_f1(pred_tags, gold_tags)}


class TaskModel:
    """A fine-tuned backbone with its head, for prediction: `load_task_model(run_dir / "model")`."""

    def __init__(self, loaded, head, record: dict[str, Any]):
        self.loaded, self.head, self.labels, self.task = loaded, head.eval(), record["labels"], record["task"]
        self.loaded.model.eval()

    @torch.no_grad()
    def probabilities(self, texts: list[str], batch_size: int = 32) -> list[list[float]]:
        """Each text's probability of every label (in `labels` order). A text longer than the
        context keeps its end (causal) or its start (encoder), as in training."""
        tok, context = self.loaded.tokenizer, self.loaded.config.context
        rows = [tok.encode(text) or [tok.pad_id or 0] for text in texts]
        rows = [ids[-context:] if self.loaded.config.causal else ids[:context] for ids in rows]
        return self.probabilities_of(rows, batch_size)

    @torch.no_grad()
    def probabilities_of(self, rows: list[list[int]], batch_size: int = 32) -> list[list[float]]:
        """`probabilities` of token-id rows (non-empty, within the context)."""
        pad = self.loaded.tokenizer.pad_id or 0
        out: list[list[float]] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            x = torch.full((len(chunk), max(map(len, chunk))), pad, dtype=torch.long)
            for i, ids in enumerate(chunk):
                x[i, :len(ids)] = torch.tensor(ids)
            n = torch.tensor([len(ids) for ids in chunk])
            out += self.head(backbone_hidden(self.loaded.model, x, n), n).float().softmax(-1).tolist()
        return out

    def classify(self, texts: list[str]) -> list[str]:
        return [self.labels[max(range(len(p)), key=p.__getitem__)] for p in self.probabilities(texts)]

    @torch.no_grad()
    def tag(self, sentences: list[list[str]]) -> list[list[str]]:
        tok, causal = self.loaded.tokenizer, self.loaded.config.causal
        out = []
        for words in sentences:
            ids, where = [], []
            for text in word_texts(words):
                piece = tok.encode(text) or [tok.pad_id or 0]
                where.append(len(ids) + (len(piece) - 1 if causal else 0))
                ids += piece
            ids = ids[:self.loaded.config.context]
            x = torch.tensor([ids])
            pred = self.head(backbone_hidden(self.loaded.model, x, torch.tensor([len(ids)])))[0].argmax(-1)
            out.append([self.labels[int(pred[j])] for j in where if j < len(ids)])
        return out


def load_task_model(path: str | Path, base: str | Path | None = None) -> TaskModel:
    """A `model/` (full) or `adapter/` (lora) directory written by `lmforge finetune --task classify|tag`."""
    import lmforge
    from lmforge.adapters import ADAPTER_CONFIG, apply_adapter, read_adapter

    folder = Path(path)
    if not folder.is_dir():
        raise LmforgeError(f"model directory {folder} not found")
    if not (folder / "head.json").is_file() or not (folder / "head.safetensors").is_file():
        raise LmforgeError(f"{folder} has no task head (head.json, head.safetensors): was it trained with "
                           "--task classify or tag?")
    head, record = load_head(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        base = base or read_adapter(folder)[2].get("base", {}).get("path")
        if not base:
            raise LmforgeError(f"{folder} is an adapter without a recorded base model; pass base=")
        loaded = apply_adapter(lmforge.load(base), folder, merge=True)
    else:
        loaded = lmforge.load(folder)
    return TaskModel(loaded, head, record)


def load_head(folder: Path) -> tuple[SequenceClassifier | TokenClassifier, dict[str, Any]]:
    """The task head in `folder` (head.json and head.safetensors) and what head.json says."""
    import json

    from safetensors.torch import load_file

    record = json.loads((folder / "head.json").read_text())
    state = load_file(str(folder / "head.safetensors"))
    n, d = state["score.weight"].shape
    head = (SequenceClassifier(d, n, record.get("pooling") or "last") if record["task"] == "classify"
            else TokenClassifier(d, n))
    head.load_state_dict(state)
    return head, record
