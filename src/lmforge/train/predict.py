"""`lmforge classify` and `lmforge tag`: predictions of a head trained by `lmforge finetune
--task classify|tag` (listed in `lmforge.cli`'s table).

Texts come from `--text` (repeatable) or `--file`: plain text, one text a line, or JSONL (a
.jsonl file, or stdin whose first line is a JSON object) with the text in `--text-field` (tagging also reads pre-split words from `--tokens-field`, as its
training data holds them). Output is one readable line per text, or with `--json` one JSON
object per line, the input record's own fields kept.

Tagging labels words, as train/labeling.py describes; each entity comes with its character
offsets in the text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lmforge.data.jsonl import json_objects
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
    from lmforge.train.labeling import classification  # torch: not for `lmforge --help`

    records = _read_inputs(text, file, text_field)
    tuned = _load(model, base, "classify")
    probabilities = tuned.probabilities([r[text_field] for r in records])
    width = max(map(len, tuned.labels))
    for record, probs in zip(records, probabilities):
        result = classification(tuned.labels, probs)
        if as_json:
            _print(json.dumps({**record, **result}, ensure_ascii=False))
        else:
            _print(f"{result['label']:<{width}}  {max(probs):.3f}  {record[text_field]}")


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
    from lmforge.train.labeling import tag_text  # torch: not for `lmforge --help`

    records = _read_inputs(text, file, text_field, tokens_field)
    tuned = _load(model, base, "tag")
    for record in records:
        # Pre-split words, as in the training data, are used when present: offsets into the joined words.
        words = [str(w) for w in record[tokens_field]] if isinstance(record.get(tokens_field), list) else None
        out = tag_text(tuned, record.get(text_field), words)
        if out.get("untagged_words"):
            print(f"note: {out['untagged_words']} word(s) past the model's context of {tuned.loaded.config.context} "
                  f"tokens were not tagged: {out['text'][:40]!r}...", file=sys.stderr)
        if as_json:
            _print(json.dumps({**record, **out}, ensure_ascii=False))
        else:
            _print(" ".join(f"{w['word']}/{w['tag']}" for w in out["words"]))
            _print("  entities: " + (", ".join(f"{e['type']} {e['text']!r}" for e in out["entities"]) or "none"))
