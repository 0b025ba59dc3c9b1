"""`lmforge classify` and `lmforge tag`: predictions of a head trained by `lmforge finetune
--task classify|tag` (listed in `lmforge.cli`'s table).

Texts come from `--text` (repeatable) or `--file`: plain text, one text a line, or JSONL (a
.jsonl file, or stdin whose first line is a JSON object) with the text in `--text-field` (tagging also reads pre-split words from `--tokens-field`, as its
training data holds them). Output is one readable line per text, or with `--json` one JSON
object per line, the input record's own fields kept.

Tagging labels words. A text is split into words the way tagging corpora are: runs of letters
and digits, each other symbol on its own, and each Chinese or Japanese character on its own
(those corpora label characters). An entity is a B- word and the I- words of its type after it,
given with its character offsets in the text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lmforge.data.jsonl import json_objects
from lmforge.data.words import join_words, split_words
from lmforge.errors import LmforgeError

ModelArg = Annotated[Path, typer.Argument(help="A model/ or adapter/ directory written by lmforge finetune "
                                               "--task classify|tag (it holds head.json).")]
TextOpt = Annotated[Optional[list[str]], typer.Option("--text", "-t", help="A text; repeat for several.")]
FileOpt = Annotated[Optional[Path], typer.Option(help="Texts, one a line, or JSONL (.jsonl); - reads stdin.")]
FieldOpt = Annotated[str, typer.Option(help="The JSONL field holding the text.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line instead of readable lines.")]
BaseOpt = Annotated[Optional[Path], typer.Option(help="The base model of an adapter that does not record it.")]


def _read_inputs(texts: list[str] | None, file: Path | None, text_field: str,
                 tokens_field: str | None = None) -> list[dict[str, Any]]:
    """Input records: {"text": ...} from --text and plain lines, the objects themselves from JSONL.
    A record must hold a string `text_field`, or (tagging) a list of words in `tokens_field`."""
    if not texts and file is None:
        raise LmforgeError("give the text to label: --text TEXT (repeatable) or --file FILE")
    records = [{text_field: t} for t in texts or []]
    if file is None:
        return records
    if str(file) == "-":
        lines, name = sys.stdin.read().splitlines(), "stdin"
    elif not file.is_file():
        raise LmforgeError(f"{file} not found")
    else:
        try:
            lines, name = file.read_text(encoding="utf-8").splitlines(), str(file)
        except UnicodeDecodeError:
            raise LmforgeError(f"{file} is not UTF-8 text") from None
    first = next((line for line in lines if line.strip()), "")
    if file.suffix != ".jsonl" and not (name == "stdin" and first.lstrip().startswith("{")):
        return records + [{text_field: line} for line in lines if line.strip()]
    for number, obj in json_objects(lines, name):
        has_words = tokens_field is not None and isinstance(obj.get(tokens_field), list)
        if not (isinstance(obj.get(text_field), str) or has_words):
            wanted = f"a string field {text_field!r}" + (f" or a list field {tokens_field!r}" if tokens_field else "")
            raise LmforgeError(f"{name} line {number}: expected a JSON object with {wanted}")
        records.append(obj)
    if not records:
        raise LmforgeError(f"{name} holds no text to label")
    return records


def _load(model: Path, base: Path | None, task: str):
    from lmforge.train.classify import load_task_model

    tuned = load_task_model(model, base)
    if tuned.task != task:
        raise LmforgeError(f"{model} holds a {tuned.task} head; use lmforge {tuned.task} {model}")
    return tuned


def _print(line: str) -> None:
    """Model output as it is: no console wrapping, no markup."""
    print(line, flush=True)


def classify(
    model: ModelArg,
    text: TextOpt = None,
    file: FileOpt = None,
    text_field: FieldOpt = "text",
    as_json: JsonOpt = False,
    base: BaseOpt = None,
):
    """Label texts with a trained classification head: the label, its probability, the text."""
    records = _read_inputs(text, file, text_field)
    tuned = _load(model, base, "classify")
    probabilities = tuned.probabilities([r[text_field] for r in records])
    width = max(map(len, tuned.labels))
    for record, probs in zip(records, probabilities):
        best = max(range(len(probs)), key=probs.__getitem__)
        if as_json:
            _print(json.dumps({**record, "label": tuned.labels[best], "probability": round(probs[best], 6),
                               "probabilities": {lb: round(p, 6) for lb, p in zip(tuned.labels, probs)}},
                              ensure_ascii=False))
        else:
            _print(f"{tuned.labels[best]:<{width}}  {probs[best]:.3f}  {record[text_field]}")


def entities(words: list[tuple[str, int, int]], tags: list[str], text: str) -> list[dict[str, Any]]:
    """The BIO entities over `words` (word, start, end), with their text and character offsets."""
    from lmforge.model.heads import bio_spans

    spans = sorted(bio_spans(tags))
    return [{"text": text[words[a][1]:words[b - 1][2]], "type": kind, "start": words[a][1], "end": words[b - 1][2]}
            for a, b, kind in spans]


def tag(
    model: ModelArg,
    text: TextOpt = None,
    file: FileOpt = None,
    text_field: FieldOpt = "text",
    tokens_field: Annotated[str, typer.Option(help="The JSONL field holding pre-split words (used when present).")] = "tokens",
    as_json: JsonOpt = False,
    base: BaseOpt = None,
):
    """Tag each word of texts with a trained token-classification (BIO) head, and list the entities."""
    records = _read_inputs(text, file, text_field, tokens_field)
    tuned = _load(model, base, "tag")
    sentences = []
    for r in records:
        if isinstance(r.get(tokens_field), list):  # pre-split, as in the training data: offsets into the joined words
            sentences.append(join_words([str(w) for w in r[tokens_field]]))
        else:
            sentences.append((r[text_field], split_words(r[text_field])))
    predicted = [tuned.tag([[w for w, _, _ in words]])[0] if words else [] for _, words in sentences]
    for record, (source, words), tags in zip(records, sentences, predicted):
        untagged = len(words) - len(tags)
        if untagged:
            print(f"note: {untagged} word(s) past the model's context of {tuned.loaded.config.context} tokens "
                  f"were not tagged: {source[:40]!r}...", file=sys.stderr)
        found = entities(words, tags, source)
        if as_json:
            out = {**record, "text": source,
                   "words": [{"word": w, "tag": t, "start": a, "end": b} for (w, a, b), t in zip(words, tags)],
                   "entities": found}
            if untagged:
                out["untagged_words"] = untagged
            _print(json.dumps(out, ensure_ascii=False))
        else:
            _print(" ".join(f"{w}/{t}" for (w, _, _), t in zip(words, tags)))
            _print("  entities: " + (", ".join(f"{e['type']} {e['text']!r}" for e in found) or "none"))
