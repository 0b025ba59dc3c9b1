"""`lmforge compare`: the compression report, one row per model directory.

Parameters, weight-file size, validation perplexity, batch-1 greedy decode speed and the
energy per generated token, as a table and a PNG bar chart. The models are held together and their speeds measured in
interleaved rounds (each model once a round, the median of the rounds reported), so a busy
moment of the machine slows every model alike and the speeds compare with each other (not
across machines).

Energy per token is read from the same counter as training summaries (`eval.compute.EnergyMeter`:
RAPL on CPUs, NVML on NVIDIA GPUs) over the timed decode loops only; where there is none it is
the device's default power times those loops' time, and `energy_source` says "estimate". The
counter covers the whole package or GPU, so other work on the machine is counted too.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmforge.compress.qlinear import matmul_bytes
from lmforge.errors import LmforgeError
from lmforge.model import Transformer


@dataclass
class Row:
    model: str
    method: str
    parameters: int
    file_mb: float
    perplexity: float | None
    tokens_per_s: float
    weight_mb_per_token: float  # what one decoding step reads: every matmul weight once
    joules_per_token: float | None = None  # over the timed decode loops (see the module docstring)
    energy_source: str = ""
    decode_s: float = 0.0  # the timed decode loops' seconds, over which the energy is counted

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DecodeEnergy:
    """Energy over timed decode loops: what the counter measured (None without one), their
    seconds and the tokens they decoded."""

    measured_j: float | None = 0.0
    seconds: float = 0.0
    tokens: int = 0
    source: str | None = None

    def add(self, meter, seconds: float, tokens: int) -> None:
        joules = meter.joules()
        self.measured_j = None if joules is None or self.measured_j is None else self.measured_j + joules
        self.source = meter.source
        self.seconds += seconds
        self.tokens += tokens

    def per_token(self, device) -> tuple[float | None, str]:
        from lmforge.eval.compute import energy_used

        if not self.tokens:
            return None, ""
        joules, source = energy_used(self.seconds, device, self.measured_j, self.seconds, self.source)
        return joules / self.tokens, source


@torch.inference_mode()
def decode_tokens_per_s(model: Transformer, new_tokens: int = 64, prompt: int = 8, repeats: int = 3,
                        native: bool = True, energy: DecodeEnergy | None = None, powercap: Path | None = None) -> float:
    """Batch-1 greedy decoding speed with the KV cache (median of `repeats` runs after a warm-up),
    through the native fast path where the model takes it, as `lmforge generate` decodes.
    `energy` accumulates the timed runs' energy (`powercap`: another RAPL tree to read)."""
    from lmforge.eval.compute import EnergyMeter

    from lmforge.infer.native_decode import NativeDecoder, step_cache

    new_tokens = max(1, min(new_tokens, model.config.context - prompt - 1))
    ids = torch.arange(prompt)[None] % model.config.vocab
    speeds = []
    for run in range(repeats + 1):
        cache = model.new_cache(1, capacity=prompt + new_tokens + 1)
        logits = model(ids, cache, last_only=True)[:, -1]
        decoder = NativeDecoder.for_cache(model, cache) if native else None
        meter = EnergyMeter(next(model.parameters()).device, powercap) if energy is not None and run else None
        start = time.perf_counter()
        for _ in range(new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            if decoder is not None:
                logits = step_cache(decoder, cache, nxt[:, 0].tolist())
            else:
                logits = model(nxt, cache, last_only=True)[:, -1]
        if run:  # the first run warms caches and allocators
            seconds = time.perf_counter() - start
            speeds.append(new_tokens / seconds)
            if meter is not None:
                energy.add(meter, seconds, new_tokens)
    return statistics.median(speeds)


def describe(path: Path, meta: dict) -> str:
    q = meta.get("quantization")
    if q:
        algo = q.get("algorithm", "rtn")
        g = f" g{q['group_size']}" if q.get("group_size") else ""
        return f"{q['method']}{g}" + (f" ({algo})" if algo not in ("rtn", "dynamic") else "")
    p = meta.get("pruning")
    if p:
        return f"{p['method']} {p['pattern']} {p['sparsity']:.0%}"
    if meta.get("distillation"):
        return "distilled"
    return "fp32"


def measure(path: Path, data: Path | None, max_batches: int):
    """(the row without its speed, the loaded model)."""
    import lmforge
    from lmforge.compress.storage import quantized_params, stored_weight_bytes

    m = lmforge.load(path)
    m.check_generates()  # the report measures decoding speed
    perplexity = None
    if data is not None:
        perplexity = validation_perplexity(m, data, max_batches)
    size = stored_weight_bytes(Path(path))
    row = Row(str(path), describe(path, m.meta), quantized_params(m.model), size / 1e6, perplexity, 0.0,
              matmul_bytes(m.model) / 1e6)
    return row, m


def validation_perplexity(m, data: Path, max_batches: int) -> float:
    from lmforge.data.loader import TokenSplit
    from lmforge.eval.perplexity import evaluate_split, evaluate_text

    if Path(data).is_dir():
        split = TokenSplit(data, "val")
        if split.vocab_size > m.config.vocab:
            raise LmforgeError(f"{data} was tokenized with a larger vocabulary than {m.path} has")
        return evaluate_split(m.model, split, batch_size=8, max_batches=max_batches).perplexity
    if not Path(data).is_file():
        raise LmforgeError(f"evaluation data {data} not found")
    return evaluate_text(m.model, m.tokenizer, data).perplexity


def compare(models: list[Path], data: Path | None = None, max_batches: int = 20, new_tokens: int = 64,
            chart: Path | None = None, rounds: int = 5, powercap: Path | None = None) -> list[Row]:
    if not models:
        raise LmforgeError("give at least one model directory")
    measured = [measure(Path(p), data, max_batches) for p in models]
    speeds: list[list[float]] = [[] for _ in measured]
    energies = [DecodeEnergy() for _ in measured]
    for _ in range(rounds):
        for speed, energy, (_, m) in zip(speeds, energies, measured):
            speed.append(decode_tokens_per_s(m.model, new_tokens, repeats=1, energy=energy, powercap=powercap))
    rows = [row for row, _ in measured]
    for row, speed, energy, (_, m) in zip(rows, speeds, energies, measured):
        row.tokens_per_s = statistics.median(speed)
        row.joules_per_token, row.energy_source = energy.per_token(next(m.model.parameters()).device)
        row.decode_s = energy.seconds
    if chart is not None:
        plot(rows, chart)
    return rows


def plot(rows: list[Row], out: Path) -> Path:
    from lmforge.plotting import pyplot

    plt = pyplot()  # headless, with a CJK fallback font

    labels = [f"{Path(r.model).name}\n{r.method}" for r in rows]
    panels = [("weight files (MB)", [r.file_mb for r in rows]),
              ("batch-1 decode (tokens/s)", [r.tokens_per_s for r in rows])]
    if all(r.joules_per_token is not None for r in rows):
        measured = all(not r.energy_source.startswith("estimate") for r in rows)
        panels.append((f"J per generated token{'' if measured else ' (estimate)'}", [r.joules_per_token for r in rows]))
    if all(r.perplexity is not None for r in rows):
        panels.insert(1, ("validation perplexity", [r.perplexity for r in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8))
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
    fig.suptitle("lmforge compare")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
