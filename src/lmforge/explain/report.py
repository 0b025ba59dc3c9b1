"""`lmforge explain MODEL --prompt ... --out report.html`: one self-contained HTML page.

The page holds the prompt's tokens, the next-token prediction, token attributions
(gradient x input and integrated gradients, as coloured tokens and a bar chart), the
attention weights of every head (one PNG heatmap grid per layer) and a logit-lens table.
Images are PNGs embedded as base64 `data:` URIs, so the file can be mailed or archived.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from jinja2 import Environment

from lmforge.errors import LmforgeError
from lmforge.explain.inspect import Head, attention_maps, attributions, logit_lens, next_token_distribution
from lmforge.explain.tokens import token_label
from lmforge.plotting import PAGE_CSS, png_data_uri
from lmforge.plotting import pyplot as _pyplot


def attention_figure(maps: torch.Tensor, layer: int, tokens: list[str]) -> str:
    """One layer's heads side by side (rows of 4), queries down, keys across."""
    plt = _pyplot()
    n_head = maps.shape[1]
    cols = min(4, n_head)
    rows = -(-n_head // cols)
    size = 1.2 + 0.22 * len(tokens)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= n_head:
            ax.axis("off")
            continue
        ax.imshow(maps[layer, h].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer} head {h}", fontsize=8)
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
    return png_data_uri(fig)


def attribution_figure(tokens: list[str], gxi: np.ndarray, ig: np.ndarray, target: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(tokens) + 1), 3))
    x = np.arange(len(tokens))
    ax.bar(x - 0.2, gxi, 0.4, label="gradient x input")
    ax.bar(x + 0.2, ig, 0.4, label="integrated gradients")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(x, tokens, rotation=60, fontsize=7)
    ax.set_title(f"attribution toward {target}", fontsize=9)
    ax.legend(fontsize=7)
    return png_data_uri(fig)


def _shade(values: np.ndarray) -> list[str]:
    """A red (positive) / blue (negative) background per token, scaled to the largest |value|."""
    scale = float(np.abs(values).max()) or 1.0
    out = []
    for v in values:
        a = min(1.0, abs(float(v)) / scale) * 0.8
        out.append(f"rgba(220,40,40,{a:.2f})" if v >= 0 else f"rgba(40,90,220,{a:.2f})")
    return out


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge explain: {{ title }}</title>
<style>{{ css|safe }}</style></head><body>
<h1>lmforge explain</h1>
<p>model <code>{{ model }}</code> &middot; {{ n_tokens }} tokens &middot; {{ n_layer }} layers &times; {{ n_head }} heads</p>
<h2>Prompt and prediction</h2>
<p>{% for t in tokens %}<span class="tok" style="background:#eee">{{ t }}</span>{% endfor %}</p>
<table><tr><th>{{ target_kind }}</th><th>probability</th></tr>
{% for name, p in prediction %}<tr><td class="mono">{{ name }}</td><td>{{ "%.4f"|format(p) }}</td></tr>{% endfor %}</table>
<h2>Attributions toward {{ target }}</h2>
<p class="muted">Red pushes the score of {{ target }} up, blue down. Integrated gradients: from a baseline prompt of
<code>{{ baseline_token }}</code> at every position to the real one, {{ steps }}-point Gauss-Legendre quadrature; they
sum to {{ "%.4f"|format(ig_sum) }} against a score difference of {{ "%.4f"|format(score_diff) }}
(score {{ "%.4f"|format(score) }}, baseline {{ "%.4f"|format(baseline) }}).</p>
{% for method, shades, values in shaded %}<p><b>{{ method }}</b><br>
{% for t in tokens %}<span class="tok" title="{{ '%.4f'|format(values[loop.index0]) }}" style="background:{{ shades[loop.index0] }}">{{ t }}</span>{% endfor %}</p>{% endfor %}
<img alt="attribution bar chart" src="{{ attribution_png }}">
<h2>Logit lens</h2>
<p class="muted">The most likely next token read from the residual stream after each layer (through the final norm and the LM head), at every position; probability in brackets.</p>
<table><tr><th>layer</th>{% for t in tokens %}<th class="mono">{{ t }}</th>{% endfor %}<th>top {{ k }} at the last position</th></tr>
{% for row in lens %}<tr><td>{{ row.layer }}</td>{% for name, p in row.cells %}<td class="mono">{{ name }} <span class="muted">({{ "%.2f"|format(p) }})</span></td>{% endfor %}
<td class="mono">{{ row.last }}</td></tr>{% endfor %}</table>
<h2>Attention</h2>
{% for png in attention_pngs %}<img alt="attention heatmaps, layer {{ loop.index0 }}" src="{{ png }}">{% endfor %}
</body></html>
"""


def explain(lm, prompt: str, out: str | Path, head: Head | None = None, labels: list[str] | None = None,
            steps: int = 32, top_k: int = 5) -> Path:
    """Write the report for `prompt` to `out`. With a classification `head` (and its `labels`),
    attributions and the prediction table are about the predicted label."""
    tok, model = lm.tokenizer, lm.model
    if not prompt:
        raise LmforgeError("the prompt is empty: give --prompt some text")
    ids = tok.encode(prompt)
    if len(ids) > model.config.context:
        raise LmforgeError(f"the prompt is {len(ids)} tokens, more than the model's context of {model.config.context}")
    baseline = tok.eos_id if tok.eos_id is not None else tok.pad_id
    if baseline is None:
        raise LmforgeError("the tokenizer has no end-of-text or padding token to build the attribution baseline from")
    ids_t = torch.tensor(ids, device=model.tok_emb.weight.device)

    def show(token_id: int) -> str:
        return token_label(tok, token_id)

    tokens = [show(i) for i in ids]
    model.eval()
    maps = attention_maps(model, ids_t).cpu()
    attr = attributions(model, ids_t, head=head, steps=steps, baseline=baseline)
    if head is None:
        prediction = [(show(t), p) for t, p in next_token_distribution(model, ids_t, top_k)]
        target, kind = f"next token '{show(attr.target)}'", "next token"
    else:
        with torch.no_grad():
            probs = head(model.hidden_states(ids_t[None])).float().softmax(-1)[0]
        names = labels or [f"label {i}" for i in range(len(probs))]
        prediction = sorted(zip(names, probs.tolist()), key=lambda r: -r[1])[:top_k]
        target, kind = f"label {names[attr.target]!r}", "label"
    lens = [{"layer": r.layer, "cells": [(show(t[0][0]), t[0][1]) for t in r.top],
             "last": ", ".join(f"{show(t)} {p:.2f}" for t, p in r.top[-1])}
            for r in logit_lens(model, ids_t, top_k)]
    page = Environment(autoescape=True).from_string(PAGE).render(
        css=PAGE_CSS, title=prompt[:60], model=str(lm.path), tokens=tokens, n_tokens=len(ids),
        n_layer=maps.shape[0], n_head=maps.shape[1], prediction=prediction, target=target, target_kind=kind,
        steps=attr.steps, baseline_token=show(baseline),
        ig_sum=float(attr.integrated_gradients.sum()), score_diff=attr.score - attr.baseline_score,
        score=attr.score, baseline=attr.baseline_score,
        shaded=[("gradient x input", _shade(attr.gradient_x_input), attr.gradient_x_input.tolist()),
                ("integrated gradients", _shade(attr.integrated_gradients), attr.integrated_gradients.tolist())],
        attribution_png=attribution_figure(tokens, attr.gradient_x_input, attr.integrated_gradients, target),
        lens=lens, k=top_k, attention_pngs=[attention_figure(maps, layer, tokens) for layer in range(maps.shape[0])])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def explain_command(model: Path, prompt: str, out: Path, steps: int, top_k: int, console) -> None:
    import lmforge

    path = explain(lmforge.load(model), prompt, out, steps=steps, top_k=top_k)
    console.print(f"report: {path} ({path.stat().st_size / 1024:.0f} KiB)")
