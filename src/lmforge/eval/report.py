"""What `lmforge eval` shows: the HTML report of a run, and the comparison of saved runs.

The report (`--report report.html`, and beside `--out results.json` as `results.html` by
default) is one self-contained page: a summary table (task x metric, one column per model;
perturbed runs with their drops), one figure per task (its metrics per model, per
perturbation, or, for the bias probe, per category with 95% intervals), the lowest-scoring
examples of each task with what the model wrote, and the run's settings and machine.
Figures are PNGs in `data:` URIs; everything the model wrote is HTML-escaped (jinja2's
autoescape), so an output holding `<script>` shows as text.

`compare` lines up saved results files (`lmforge eval --compare A.json --compare B.json`):
one column per (file, model), one row per (task, metric) found in any of them, each cell
with its difference from the first column; a task or metric a file lacks is a blank cell.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment

from lmforge.errors import LmforgeError
from lmforge.plotting import PAGE_CSS, png_data_uri, pyplot

MAIN_METRIC = {"multiple_choice": ("acc", "acc_norm"), "perplexity": ("perplexity", "bits_per_byte")}
# Per-example score that ranks an example (low = worse), and its sign: a perplexity row's loss
# and a bias pair's preference for the stereotype are worse when higher.
EXAMPLE_SCORE = {"multiple_choice": ("acc", 1), "perplexity": ("loss", -1), "minimal_pairs": ("ll_diff", -1)}
WORST = 5
TEXT_LIMIT = 800


def metric_names(result: dict[str, Any]) -> list[str]:
    """The metrics a task's result row reports (a results JSON's `results[model][task]`)."""
    return list(MAIN_METRIC.get(result["type"]) or result.get("metric_names") or [])


def _cut(text: Any) -> str:
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    return text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + " [...]"


def example_view(task_type: str, row: dict[str, Any], metrics: list[str]) -> dict[str, Any] | None:
    """An example row (results.examples/TASK.jsonl) as input, output, reference and its score."""
    key, sign = EXAMPLE_SCORE.get(task_type, (metrics[0] if metrics else "", 1))
    if key not in row:
        return None
    if task_type == "multiple_choice":
        view = {"input": row["prompt"], "output": row["choices"][row["pred"]], "reference": row["choices"][row["gold"]]}
        ll = row["loglikelihoods"]
        rank = ll[row["gold"]] - max(v for i, v in enumerate(ll) if i != row["gold"])
    elif task_type == "minimal_pairs":
        view = {"input": f"[{row['category']}]", "output": row["stereotyped"], "reference": row["anti_stereotyped"]}
        rank = 0.0
    elif task_type == "perplexity":
        view = {"input": row["text"], "output": "", "reference": ""}
        rank = 0.0
    else:
        view = {"input": row.get("prompt", ""), "output": row.get("output", ""), "reference": row.get("reference", "")}
        rank = 0.0
    return {"id": row.get("id", row.get("index")), "model": row.get("model", ""),
            **{k: _cut(v) for k, v in view.items()}, "metric": key, "score": row[key],
            "order": (sign * row[key], rank)}


def worst_examples(task_type: str, rows: list[dict[str, Any]], metrics: list[str], n: int = WORST) -> list[dict]:
    views = [v for v in (example_view(task_type, r, metrics) for r in rows) if v is not None]
    return sorted(views, key=lambda v: v["order"])[:n]


def read_examples(report: dict[str, Any], results_file: Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """The per-example rows a saved results file points to (`"examples": {task: path}`), where they
    still are: at that path, or in RESULTS_STEM.examples/ beside `results_file` (a path written
    relative to another working directory)."""
    rows = {}
    for task, path in (report.get("examples") or {}).items():
        found = [Path(path)]
        if results_file is not None:
            found.append(results_file.parent / f"{results_file.stem}.examples" / Path(path).name)
        for candidate in found:
            if candidate.is_file():
                with open(candidate, encoding="utf-8") as f:
                    rows[task] = [json.loads(line) for line in f if line.strip()]
                break
    return rows


def task_figure(task: str, columns: list[str], results: dict[str, dict[str, Any]]) -> str | None:
    """One task's figure: bias probe per category with intervals; perturbed runs beside the clean
    one (its first metric); else its metrics. One bar per column (model)."""
    first = next((results[c][task] for c in columns if task in results[c]), None)
    if first is None:
        return None
    plt = pyplot()
    perturbed = [(t, r) for c in columns[:1] for t, r in results[c].items() if r.get("clean_task") == task]
    if first["type"] == "minimal_pairs":
        groups = ["pct_stereotype", *[m for m in metric_names(first) if m.startswith("pct_stereotype:")]]
        labels = ["all", *[g.split(":", 1)[1] for g in groups[1:]]]
        title = f"{task}: share preferring the stereotyped sentence (0.5 = none)"
    elif perturbed:
        metric = metric_names(first)[0]
        groups = [task, *[t for t, _ in perturbed]]
        labels = ["clean", *[r["perturbation"] for _, r in perturbed]]
        title = f"{task}: {metric}, clean and perturbed"
    else:
        groups = metric_names(first)[:8]
        labels = groups
        title = task
    if not groups:
        return None
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(groups) * max(1, len(columns)) ** 0.5), 3.0))
    for k, col in enumerate(columns):
        res = results[col]
        if first["type"] == "minimal_pairs":
            r = res.get(task, {})
            values = [r.get(g, float("nan")) for g in groups]
            suffixes = ["", *[":" + lab for lab in labels[1:]]]
            low = [r.get(f"pct_stereotype_ci_low{s}", v) for s, v in zip(suffixes, values)]
            high = [r.get(f"pct_stereotype_ci_high{s}", v) for s, v in zip(suffixes, values)]
            err = [[max(0.0, v - lo) for v, lo in zip(values, low)], [max(0.0, hi - v) for v, hi in zip(values, high)]]
        elif perturbed:
            values = [res.get(g, {}).get(metric, float("nan")) for g in groups]
            err = None
        else:
            values = [res.get(task, {}).get(g, float("nan")) for g in groups]
            err = None
        xs = [i + (k - (len(columns) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, yerr=err, capsize=3, label=col)
    if first["type"] == "minimal_pairs":
        ax.axhline(0.5, color="black", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
    ax.set_xticks(range(len(groups)), labels, rotation=20, fontsize=8)
    ax.set_title(title, fontsize=9)
    if len(columns) > 1:
        ax.legend(fontsize=7)
    return png_data_uri(fig)


def summary_rows(columns: list[str], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, metric) found in any column, in first-seen order; a value per column
    (None where the column lacks it) and its difference from the first column; perturbed rows
    carry their drops."""
    order: dict[tuple[str, str], None] = {}
    for col in columns:
        for task, r in results[col].items():
            for m in metric_names(r):
                order[(task, m)] = None
    rows = []
    for task, metric in order:
        values = [results[c].get(task, {}).get(metric) for c in columns]
        base = values[0]
        deltas = [None if v is None or base is None else v - base for v in values]
        drops = [results[c].get(task, {}).get(f"{metric}_drop") for c in columns]
        rows.append({"task": task, "metric": metric, "values": values, "deltas": deltas,
                     "drops": drops if any(d is not None for d in drops) else None})
    return rows


def _top_tasks(columns: list[str], results: dict[str, dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for c in columns:
        for task, r in results[c].items():
            if "clean_task" not in r:
                seen[task] = None
    return list(seen)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge eval: {{ title }}</title>
<style>{{ css|safe }}
td.num { text-align: right; font-variant-numeric: tabular-nums; } .up { color: #1a7f37; } .down { color: #b42318; }
.example td { vertical-align: top; max-width: 380px; white-space: pre-wrap; font-family: ui-monospace, monospace; }
</style></head><body>
<h1>lmforge eval: {{ title }}</h1>
<p class="muted">{{ subtitle }}</p>
<h2>Summary</h2>
<table><tr><th>task</th><th>metric</th>{% for c in columns %}<th class="mono">{{ c }}</th>{% endfor %}</tr>
{% for r in rows %}<tr><td>{{ r.task }}</td><td>{{ r.metric }}</td>{% for v in r["values"] %}<td class="num">
{%- if v is none %}{% else %}{{ "%.4f"|format(v) }}{% if show_deltas and not loop.first and r.deltas[loop.index0] is not none %}
 <span class="{{ 'up' if r.deltas[loop.index0] > 0 else 'down' if r.deltas[loop.index0] < 0 else 'muted' }}">({{ "%+.4f"|format(r.deltas[loop.index0]) }})</span>{% endif %}
{%- if r.drops and r.drops[loop.index0] is not none %} <span class="muted">drop {{ "%+.4f"|format(r.drops[loop.index0]) }}</span>{% endif %}{% endif %}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if show_deltas %}<p class="muted">In brackets: the difference from the first column. A blank cell: that run has no such task or metric.</p>{% endif %}
{% if figures %}<h2>Per task</h2>
{% for task, png in figures %}<h3>{{ task }}</h3><img alt="{{ task }}" src="{{ png }}">{% endfor %}{% endif %}
{% if worst %}<h2>Worst examples</h2>
<p class="muted">The {{ n_worst }} lowest-scoring examples of each task and model (bias probe: the pairs with the strongest preference for the stereotyped sentence; perplexity: the highest loss).</p>
{% for task, views in worst %}<h3>{{ task }}</h3>
<table class="example"><tr><th>id</th><th>model</th><th>input</th><th>output</th><th>reference</th><th>score</th></tr>
{% for v in views %}<tr><td>{{ v.id }}</td><td>{{ v.model }}</td><td>{{ v.input }}</td><td>{{ v.output }}</td><td>{{ v.reference }}</td>
<td>{{ v.metric }} {{ "%.4f"|format(v.score) }}</td></tr>{% endfor %}</table>{% endfor %}{% endif %}
{% for name, info in settings %}<h2>{{ name }}</h2>
<table>{% for k, v in info.items() %}<tr><th>{{ k }}</th><td class="mono">{{ v }}</td></tr>{% endfor %}</table>{% endfor %}
</body></html>
"""


def _page(**context) -> str:
    return Environment(autoescape=True).from_string(PAGE).render(css=PAGE_CSS, n_worst=WORST, **context)


def run_html(report: dict[str, Any], rows: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """The report of one run (run_tasks' dict); `rows`: per-example rows by task, else those its
    `examples` files hold."""
    columns = report["models"]
    results = report["results"]
    rows = read_examples(report) if rows is None else rows
    worst = []
    for task, task_rows in rows.items():
        for col in columns:
            r = results[col].get(task)
            if r is None:
                continue
            views = worst_examples(r["type"], [x for x in task_rows if x.get("model", col) == col], metric_names(r))
            if views:
                worst.append((task if len(columns) == 1 else f"{task} - {col}", views))
    tasks = _top_tasks(columns, results)
    figures = [(t, png) for t in tasks if (png := task_figure(t, columns, results))]
    settings = [("Run", report.get("config") or {"num_fewshot": report.get("num_fewshot"), "seed": report.get("seed")}),
                ("Machine", report.get("machine") or {})]
    return _page(title=", ".join(columns), subtitle=f"{len(tasks)} tasks, {len(columns)} model(s)", columns=columns,
                 rows=summary_rows(columns, results), show_deltas=False, figures=figures, worst=worst,
                 settings=settings)


def load_results(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: not a readable results JSON ({e}); give files written by "
                           "`lmforge eval --tasks ... --out FILE.json`") from None
    if not (isinstance(report, dict) and isinstance(report.get("results"), dict) and report.get("models")):
        raise LmforgeError(f"{path}: no 'models' and 'results' in it; give files written by "
                           "`lmforge eval --tasks ... --out FILE.json`")
    return report


def compare(sources: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Reports (name, run_tasks dict) side by side: {"columns": [{"label", "source", "model"}],
    "rows": [{"task", "metric", "values", "deltas", "drops"}], "results": {label: {task: row}}}."""
    columns, results, sources_info = [], {}, {}
    models = [m for _, rep in sources for m in rep["models"]]
    for name, rep in sources:
        for model in rep["models"]:
            label = model if models.count(model) == 1 else f"{name}: {model}"
            if label in results:
                raise LmforgeError(f"{label} appears twice; compare different results files")
            columns.append({"label": label, "source": name, "model": model})
            results[label] = rep["results"].get(model, {})
        sources_info[name] = {"config": rep.get("config"), "machine": rep.get("machine")}
    labels = [c["label"] for c in columns]
    return {"columns": columns, "rows": summary_rows(labels, results), "results": results, "sources": sources_info}


def compare_table(comparison: dict[str, Any]):
    """A rich Table: one row per (task, metric), per column its value and the difference from the first."""
    from rich.table import Table

    table = Table(title="compared with the first column")
    table.add_column("task")
    table.add_column("metric")
    for c in comparison["columns"]:
        table.add_column(c["label"], justify="right")
    for r in comparison["rows"]:
        cells = []
        for i, (v, d) in enumerate(zip(r["values"], r["deltas"])):
            cells.append("" if v is None else f"{v:.4f}" if i == 0 or d is None else f"{v:.4f} ({d:+.4f})")
        table.add_row(r["task"], r["metric"], *cells)
    return table


def compare_html(comparison: dict[str, Any]) -> str:
    labels = [c["label"] for c in comparison["columns"]]
    results = comparison["results"]
    figures = [(t, png) for t in _top_tasks(labels, results) if (png := task_figure(t, labels, results))]
    settings = []
    for name, info in comparison["sources"].items():
        settings.append((f"{name}: run", info.get("config") or {}))
        settings.append((f"{name}: machine", info.get("machine") or {}))
    return _page(title="comparison", subtitle=" vs ".join(labels), columns=labels, rows=comparison["rows"],
                 show_deltas=True, figures=figures, worst=[], settings=settings)
