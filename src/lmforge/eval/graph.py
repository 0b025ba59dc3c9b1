"""An extracted knowledge graph on disk: a CSV edge list or JSON-LD, written and read back.

An edge is (source, relation, target, doc_id): one triple a model found in one document.

- CSV: a header `source,relation,target,doc_id` and one row per edge (RFC 4180 quoting, UTF-8).
- JSON-LD: entities are nodes `{"@id": "urn:lmforge:entity:<name>", "name": ...}` (the id is
  the normalised name, percent-encoded, so "Acme" and "ACME" are one node), and each edge is a
  statement node (RDF reification) with its `subject`, `predicate` (a relation IRI under
  `urn:lmforge:relation:`), `object` and the document it came from (`wasDerivedFrom`), so the
  file loads into any JSON-LD or RDF tool and reads back to the same edges.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from lmforge.errors import LmforgeError
from lmforge.eval.triples import normalize, normalize_relation

CSV_HEADER = ("source", "relation", "target", "doc_id")
ENTITY = "urn:lmforge:entity:"
RELATION = "urn:lmforge:relation:"
CONTEXT = {
    "name": "http://schema.org/name",
    "Statement": "http://www.w3.org/1999/02/22-rdf-syntax-ns#Statement",
    "subject": {"@id": "http://www.w3.org/1999/02/22-rdf-syntax-ns#subject", "@type": "@id"},
    "predicate": {"@id": "http://www.w3.org/1999/02/22-rdf-syntax-ns#predicate", "@type": "@id"},
    "object": {"@id": "http://www.w3.org/1999/02/22-rdf-syntax-ns#object", "@type": "@id"},
    "wasDerivedFrom": "http://www.w3.org/ns/prov#wasDerivedFrom",
}
FORMATS = {".csv": "csv", ".jsonld": "jsonld", ".json": "jsonld"}


@dataclass(frozen=True)
class Edge:
    source: str
    relation: str
    target: str
    doc_id: str


def format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LmforgeError(f"cannot tell the graph format of {path}: name it .csv (an edge list) or .jsonld (JSON-LD)")
    return fmt


def entity_id(name: str) -> str:
    return ENTITY + quote(normalize(name), safe="")


def to_csv(edges: list[Edge]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(astuple(e) for e in edges)
    return out.getvalue()


def from_csv(text: str, name: str = "edges.csv") -> list[Edge]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(rows[0]) != CSV_HEADER:
        raise LmforgeError(f"{name}: the first row must be the header {','.join(CSV_HEADER)}")
    edges = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 4:
            raise LmforgeError(f"{name} row {number}: expected 4 columns ({','.join(CSV_HEADER)}), found {len(row)}")
        edges.append(Edge(*row))
    return edges


def to_jsonld(edges: list[Edge]) -> dict[str, Any]:
    names: dict[str, str] = {}  # entity id -> the name it was first written with
    statements = []
    for i, e in enumerate(edges):
        ids = []
        for name in (e.source, e.target):
            ids.append(entity_id(name))
            names.setdefault(ids[-1], name)
        statements.append({"@id": f"_:edge{i}", "@type": "Statement", "subject": ids[0],
                           "predicate": RELATION + quote(normalize_relation(e.relation), safe=""),
                           "object": ids[1], "wasDerivedFrom": e.doc_id})
    nodes = [{"@id": i, "name": n} for i, n in names.items()]
    return {"@context": CONTEXT, "@graph": nodes + statements}


def from_jsonld(doc: Any, name: str = "graph.jsonld") -> list[Edge]:
    """The edges of a graph written by `to_jsonld` (entity names from their nodes)."""
    graph = doc.get("@graph") if isinstance(doc, dict) else None
    if not isinstance(graph, list):
        raise LmforgeError(f"{name}: not a JSON-LD graph written by lmforge extract (no '@graph' list)")
    names = {n["@id"]: n["name"] for n in graph if isinstance(n, dict) and "name" in n}
    edges = []
    for n in graph:
        if isinstance(n, dict) and n.get("@type") == "Statement":
            try:
                edges.append(Edge(names[n["subject"]], unquote(n["predicate"].removeprefix(RELATION)),
                                  names[n["object"]], str(n["wasDerivedFrom"])))
            except KeyError as e:
                raise LmforgeError(f"{name}: statement {n.get('@id')} refers to {e} that is not in the graph") from None
    return edges


def write_graph(edges: list[Edge], path: str | Path) -> None:
    """Write atomically, in the format the file name says."""
    path = Path(path)
    text = to_csv(edges) if format_of(path) == "csv" else json.dumps(to_jsonld(edges), ensure_ascii=False, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_graph(path: str | Path) -> list[Edge]:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} not found")
    text = path.read_text(encoding="utf-8")
    if format_of(path) == "csv":
        return from_csv(text, str(path))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: not JSON ({e})") from None
    return from_jsonld(doc, str(path))
