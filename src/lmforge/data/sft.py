"""Supervised fine-tuning data: JSONL conversations or prompt/completion pairs -> token ids with
labels on the assistant (completion) tokens only, padded or packed into batches.

Each line of the JSONL file is one example, in one of two shapes:

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"prompt": "2 + 2 =", "completion": " 4"}

Conversations are rendered with the model's chat template (ChatML when the model has none).
The text of each assistant turn is found by rendering the conversation up to that turn with and
without it: everything the template adds for the turn (its content and end-of-turn marker) is
trained on, everything else is context. The pieces are tokenized one by one, so training sees
exactly the tokens generation will see after `apply_chat_template(..., add_generation_prompt=True)`.
A prompt/completion pair is the prompt's tokens (context) then the completion's and EOS (trained).

Packing puts several examples in one row; each keeps its own segment id, so attention stays
inside the example and positions restart at its first token (`Transformer(segment_ids=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.jsonl import listed_lines, read_json_objects
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError

IGNORE = -100  # label of a token that is context, not target (F.cross_entropy's ignore_index)


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; malformed lines are one error naming them."""
    rows = read_json_objects(path, "data file")
    if not rows:
        raise LmforgeError(f"{path} holds no examples")
    return rows


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE where the token is context
    line: int


@dataclass
class LoadStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to learn after truncation
    tokens: int = 0
    target_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        s = f"{self.examples} examples, {self.tokens:,} tokens ({self.target_tokens:,} trained on)"
        if self.truncated:
            s += f"; {self.truncated} truncated to the context"
        if self.dropped:
            s += f"; {self.dropped} dropped (no target tokens left after truncation)"
        return s


def check_messages(messages: Any, line: int, path: Path) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise LmforgeError(f"{path} line {line}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LmforgeError(f"{path} line {line}: message {i} needs a string 'role' and 'content'")
    return messages


def chat_pieces(tokenizer: TextTokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces; trained pieces are the assistant turns."""
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LmforgeError("the chat template renders a conversation differently from its beginning, so the "
                               "assistant turns cannot be located; use a prefix-stable template")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if rest.startswith(done) and len(rest) > len(done):
        pieces.append((rest[len(done):], False))
    return [(text, trained) for text, trained in pieces if text]


def reply_pieces(tokenizer: TextTokenizer, messages: list[dict[str, str]], reply: str) -> list[tuple[str, bool]]:
    """The conversation then the assistant's `reply`, rendered as `chat_pieces` renders it, with only
    the reply (and what the template adds for its turn) trained: earlier assistant turns are context."""
    conversation = [*messages, {"role": "assistant", "content": reply}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if tokenizer.apply_chat_template(conversation, add_generation_prompt=False) == prompt:
        raise LmforgeError("the chat template renders nothing for the assistant's reply, so there is nothing to "
                           "train on; check the model's chat_template")
    pieces = chat_pieces(tokenizer, conversation)  # the reply's piece is not empty, so it is the last trained one
    last = max(i for i, (_, trained) in enumerate(pieces) if trained)
    return [(text, trained and i == last) for i, (text, trained) in enumerate(pieces)]


def encode_pieces(tokenizer: TextTokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, trained in pieces:
        t = tokenizer.encode(text)
        ids += t
        labels += t if trained else [IGNORE] * len(t)
    return ids, labels


def encode_example(tokenizer: TextTokenizer, obj: dict[str, Any], line: int, path: Path) -> Example:
    if "messages" in obj:
        messages = check_messages(obj["messages"], line, path)
        if not any(m["role"] == "assistant" for m in messages):
            raise LmforgeError(f"{path} line {line}: the conversation has no assistant turn, so there is nothing "
                               "to learn from it; remove it or add the reply")
        ids, labels = encode_pieces(tokenizer, chat_pieces(tokenizer, messages))
    elif "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise LmforgeError(f"{path} line {line}: 'prompt' and 'completion' must be strings")
        if not obj["completion"]:
            raise LmforgeError(f"{path} line {line}: the completion is empty, so there is nothing to learn from it")
        ids, labels = encode_pieces(tokenizer, [(obj["prompt"], False), (obj["completion"], True)])
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
            labels.append(tokenizer.eos_id)
    else:
        raise LmforgeError(f"{path} line {line}: expected 'messages' (a chat) or 'prompt' and 'completion'; "
                           f"found keys {sorted(obj)}")
    return Example(ids, labels, line)


def load_sft(path: str | Path, tokenizer: TextTokenizer, context: int, on_long: str = "truncate"
             ) -> tuple[list[Example], LoadStats]:
    """Tokenized, masked examples of at most `context` + 1 tokens (inputs and shifted targets)."""
    path = Path(path)
    stats = LoadStats()
    examples, too_long = [], []
    for line, obj in read_jsonl(path):
        ex = encode_example(tokenizer, obj, line, path)
        if len(ex.ids) > context + 1:
            too_long.append(line)
            ex = Example(ex.ids[:context + 1], ex.labels[:context + 1], line)
        if not any(label != IGNORE for label in ex.labels[1:]):
            stats.dropped += 1  # the prompt alone filled the context
            continue
        examples.append(ex)
    if too_long and on_long == "error":
        raise LmforgeError(f"{path}: {len(too_long)} example(s) are longer than the context of {context} tokens "
                           f"({listed_lines(too_long)}); shorten them, or pass --on-long truncate")
    stats.truncated = len(too_long)
    if not examples:
        raise LmforgeError(f"{path}: every label is masked (all {stats.dropped} examples lost their target tokens "
                           "to truncation): training would learn nothing; raise the context or shorten prompts")
    stats.examples = len(examples)
    stats.tokens = sum(len(e.ids) for e in examples)
    stats.target_tokens = sum(sum(1 for label in e.labels[1:] if label != IGNORE) for e in examples)
    return examples, stats


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random `fraction` held out (at least one example when there are two or more)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = max(1, int(round(fraction * len(examples))))
    val = {int(i) for i in order[:n_val]}
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


# ----------------------------------------------------------------------------- batches

@dataclass
class Row:
    inputs: list[int]
    targets: list[int]
    segments: list[int]


def to_rows(examples: list[Example], context: int, pack: bool) -> list[Row]:
    """One row per example (padding), or examples packed first-fit into rows of `context` tokens."""
    rows: list[Row] = []
    for ex in examples:
        x, y = ex.ids[:-1], ex.labels[1:]
        if pack:
            for row in rows:
                if len(row.inputs) + len(x) <= context:
                    seg = row.segments[-1] + 1
                    row.inputs += x
                    row.targets += y
                    row.segments += [seg] * len(x)
                    break
            else:
                rows.append(Row(list(x), list(y), [1] * len(x)))
        else:
            rows.append(Row(list(x), list(y), [1] * len(x)))
    return rows


def collate(rows: list[Row], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding has target IGNORE and (packed) a segment of its own (0)."""
    T = max(len(r.inputs) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    seg = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.inputs)
        x[i, :n] = torch.tensor(r.inputs)
        y[i, :n] = torch.tensor(r.targets)
        seg[i, :n] = torch.tensor(r.segments)
    # A causal model needs no mask for right padding: real tokens never look ahead at it.
    return {"input_ids": x, "targets": y, **({"segment_ids": seg} if packed else {})}


class EpochBatches:
    """Batch number i of a shuffled-per-epoch list of items; the state is i alone (resumable)."""

    def __init__(self, items: list, batch_size: int, seed: int):
        if not items:
            raise LmforgeError("no training examples")
        self.items, self.batch_size, self.seed = items, batch_size, seed

    def _order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return self._perm

    def indices(self, index: int) -> list[int]:
        out = []
        for k in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, pos = divmod(k, len(self.items))
            out.append(int(self._order(epoch)[pos]))
        return out

    def batch(self, index: int) -> list:
        return [self.items[i] for i in self.indices(index)]


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
