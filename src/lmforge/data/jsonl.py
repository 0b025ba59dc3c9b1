"""JSON Lines as every lmforge reader takes them: one JSON object per line, blank lines skipped.

A line that is not a JSON object is an error naming the file and line (`docs.jsonl:2`), so the
user can open the file at that place. Streaming readers (corpora, labelling input) stop at the
first bad line; readers that load a whole file anyway (fine-tuning data) list all of them at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

ONE_OBJECT = "each line must be one JSON object"
MAX_LISTED = 5


def _parse(line: str) -> tuple[dict[str, Any] | None, str]:
    """(object, "") or (None, what is wrong with the line)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"
    if not isinstance(value, dict):
        return None, f"a JSON {type(value).__name__}, not an object"
    return value, ""


def json_objects(lines: Iterable[str], where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; the first bad line raises, naming `where:line`."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        value, problem = _parse(line)
        if value is None:
            raise LmforgeError(f"{where}:{number} is {problem}; {ONE_OBJECT}")
        yield number, value


def listed_lines(numbers: list[int]) -> str:
    """"lines 2, 3, 7 (and 12 more)": line numbers for an error message."""
    shown = ", ".join(map(str, numbers[:MAX_LISTED]))
    more = f" (and {len(numbers) - MAX_LISTED} more)" if len(numbers) > MAX_LISTED else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def read_json_objects(path: str | Path, what: str = "data file") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a UTF-8 file; all bad lines in one error."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{what} {path} not found")
    rows, bad, first = [], [], ""
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                value, problem = _parse(line)
                if value is None:
                    bad.append(number)
                    first = first or problem
                else:
                    rows.append((number, value))
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not UTF-8 text") from None
    if bad:
        raise LmforgeError(f"{path}: {len(bad)} malformed JSONL {listed_lines(bad)} ({first}); {ONE_OBJECT}")
    return rows
