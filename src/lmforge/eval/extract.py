"""`lmforge extract MODEL --input docs.jsonl --out graph.jsonld|edges.csv`: a model trained to
write triples (the `relation-extraction` recipe) reads documents and the triples it writes
become a knowledge graph.

Each JSONL line is a document: its text in `--text-field` (default `text`) and its id in
`--id-field` (default `id`; the line number when absent). The prompt is `--template` with
`{text}` replaced, by default the recipe's `{text}\\nTriples:`. Decoding is greedy; with
`--constrained` it follows the triples JSON schema (as `"constrained": true` in a task file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.data.jsonl import json_objects
from lmforge.errors import LmforgeError
from lmforge.eval import triples
from lmforge.eval.graph import Edge, format_of, write_graph

TEMPLATE = "{text}\nTriples:"


def read_documents(path: Path, text_field: str, id_field: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise LmforgeError(f"{path} not found (a JSONL file, one document a line)")
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, obj in json_objects(f, str(path)):
            if not isinstance(obj.get(text_field), str) or not obj[text_field].strip():
                raise LmforgeError(f"{path}:{number}: expected a JSON object with a non-empty string {text_field!r}")
            docs.append({"id": str(obj.get(id_field, number)), "text": obj[text_field]})
    if not docs:
        raise LmforgeError(f"{path} holds no documents")
    return docs


def extract_edges(lm, docs: list[dict[str, Any]], template: str = TEMPLATE, constrained: bool = False,
                  max_tokens: int = 96, batch_size: int = 16) -> tuple[list[Edge], list[dict[str, Any]]]:
    """(edges, one row per document: id, output, triples), relations normalised."""
    from lmforge.eval.extraction import constrained_outputs
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams

    prompts = [template.replace("{text}", d["text"]) for d in docs]
    if constrained:
        outputs = [samples[0][0] for samples in constrained_outputs(lm, prompts, max_tokens=max_tokens,
                                                                   batch_size=batch_size, what="document")]
    else:
        lm.check_generates()
        params = SamplingParams(max_new_tokens=max_tokens, stop=["\n"])
        outputs = []
        for b in range(0, len(prompts), batch_size):
            outputs += [c.text for c in generate(lm.model, lm.tokenizer, prompts[b:b + batch_size], params)]
    edges, rows = [], []
    for doc, text in zip(docs, outputs):
        found = triples.parse_triples(text) or []
        rows.append({"id": doc["id"], "output": text, "triples": [dict(zip(triples.FIELDS, t)) for t in found]})
        seen = set()
        for head, relation, tail in found:
            edge = Edge(head, triples.normalize_relation(relation), tail, doc["id"])
            if triples.key((head, relation, tail)) not in seen:
                seen.add(triples.key((head, relation, tail)))
                edges.append(edge)
    return edges, rows


def extract_command(model: Path, input_path: Path, out: Path, text_field: str, id_field: str, template: str,
                    constrained: bool, max_tokens: int, batch_size: int, console) -> list[Edge]:
    import lmforge

    format_of(out)  # a name that says no format is refused before the model loads
    if "{text}" not in template:
        raise LmforgeError("--template must contain {text}, where the document goes")
    docs = read_documents(input_path, text_field, id_field)
    lm = lmforge.load(model)
    edges, rows = extract_edges(lm, docs, template, constrained, max_tokens, batch_size)
    write_graph(edges, out)
    parsed = sum(bool(r["triples"]) for r in rows)
    console.print(f"{len(edges)} edges from {len(docs)} documents ({parsed} with triples) -> {out}")
    return edges
