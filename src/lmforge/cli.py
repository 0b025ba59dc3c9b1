"""`lmforge <verb>`: thin commands that parse, validate, call the library and print.

Every verb is one row of `COMMANDS` (and `DATA_COMMANDS` for `lmforge data ...`), at the end
of this file: the verb, its function (here, or in a stage's command module), whether it loads
a model directory (then it takes --key-file/--key-env for an encrypted one) and whether it
passes unknown `--section.key value` flags on as config overrides. Adding a verb is adding a row.

User mistakes raise `LmforgeError`; `main()` prints its one line and exits 2. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.compress import command as compress
from lmforge.console_text import console, err_console, print_line, print_model_text
from lmforge.data.clean.command import clean_command
from lmforge.errors import LmforgeError, TrainingInterrupted
from lmforge.interop import commands as interop
from lmforge.train import commands as training
from lmforge.train import predict
from lmforge.train.estimate_command import estimate

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"lmforge {version('lmforge')}")
        raise typer.Exit()


def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print lmforge's version and exit.")] = False):
    pass


def _load_with_adapter(model: Path, adapter: Path | None):
    """A model directory, with a LoRA adapter folded in when one is given."""
    import lmforge

    m = lmforge.load(model)
    if adapter is not None:
        from lmforge.adapters import apply_adapter

        apply_adapter(m, adapter, merge=True)
    return m


def _validated(cls, **kwargs):
    """Build a config object, turning its validation errors into one user-facing line."""
    from pydantic import ValidationError

    from lmforge.config import describe_validation_error

    try:
        return cls(**kwargs)
    except ValidationError as e:
        raise LmforgeError(describe_validation_error(e, "options")) from None


def quickstart(
    minutes: Annotated[float, typer.Option(help="Training time budget in minutes.")] = 3.0,
    out: Annotated[Path, typer.Option(help="Where runs and prepared data go.")] = Path("runs"),
    corpus: Annotated[str, typer.Option(help="shakespeare, synthetic, or a path/glob of text/JSONL files.")] = "shakespeare",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
):
    """Data -> tokenizer -> pretrain -> eval -> generate -> save and reload, in a few minutes on CPU."""
    from lmforge.quickstart import run_quickstart

    run_quickstart(minutes=minutes, out=out, corpus=corpus, progress=progress, console=console)


def train(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="A recipe YAML file, or a built-in name (quickstart, tiny, gpt2-124m).")],
    resume: Annotated[bool, typer.Option(help="Continue the run from its newest intact checkpoint.")] = False,
    resume_from: Annotated[Optional[str], typer.Option(help="Continue from this checkpoint: step-N, or a checkpoint path.")] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Continue pretraining this model directory (train.init_from).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    nproc: Annotated[int, typer.Option(help="Data-parallel processes on this machine (launches torchrun).")] = 1,
):
    """Pretrain a model from a recipe. Override any key: `--train.lr 3e-4 --model.n_layer 8`."""
    import os

    from lmforge.config import load_recipe
    from lmforge.train.trainer import train as run_training

    args = list(ctx.args) + (["--train.init_from", init_from] if init_from else [])
    cfg = load_recipe(recipe, args)
    if nproc != 1 and "WORLD_SIZE" not in os.environ:
        from lmforge.train.distributed import launch

        flags = (["--resume"] if resume else []) + (["--resume-from", resume_from] if resume_from else []) + \
            ([] if progress else ["--no-progress"])
        raise typer.Exit(launch(nproc, ["train", recipe, *flags, *args]))
    result = run_training(cfg, resume=resume, progress=progress, log=print_line, resume_from=resume_from)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    val = result.val
    console.print(f"[green]done[/]: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s; "
                  f"validation loss {val.loss:.3f}, perplexity {val.perplexity:.2f}, {val.bits_per_byte:.3f} bits/byte")
    console.print(f"model: {result.model_dir}   metrics: {result.run_dir / 'metrics.jsonl'}   "
                  f"plot: {result.run_dir / 'plots' / 'loss.png'}")
    from lmforge.eval.compute import describe_run

    console.print(f"compute: {describe_run(result.run_dir)}")


def data_prepare(
    corpus: Annotated[str, typer.Argument(help="shakespeare, synthetic, or a text/JSONL file, directory or glob.")],
    out: Annotated[Path, typer.Option(help="Output directory for shards and tokenizer.")],
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size (when training one).")] = 4096,
    tokenizer: Annotated[Optional[str], typer.Option(help="Reuse this tokenizer.json or model directory.")] = None,
    text_field: Annotated[str, typer.Option(help="JSON field holding the text in JSONL inputs.")] = "text",
    val_fraction: Annotated[float, typer.Option(help="Share of each document held out for validation.")] = 0.05,
    force: Annotated[bool, typer.Option(help="Rebuild even if OUT already holds prepared data.")] = False,
):
    """Tokenize a corpus and pack it into memory-mapped train/validation shards."""
    from lmforge.config import DataConfig, TokenizerConfig
    from lmforge.data.prepare import prepare, read_index

    cfg = _validated(DataConfig, corpus=corpus, text_field=text_field, val_fraction=val_fraction,
                     tokenizer=TokenizerConfig(vocab_size=vocab_size, path=tokenizer))
    folder = prepare(cfg, out, force=force, progress=lambda s: console.print(f"data: {s}"))
    index = read_index(folder)
    s = index["splits"]
    console.print(f"{folder}: {index['documents']} documents, vocabulary {index['vocab_size']}, "
                  f"train {s['train']['tokens']:,} tokens, validation {s['val']['tokens']:,} tokens ({index['dtype']})")


SAMPLING_FLAGS = {"max_new_tokens": "max-tokens"}  # SamplingParams fields whose flag is spelled otherwise


def generate(
    model: Annotated[Path, typer.Argument(help="A model directory.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for a batch.")],
    max_tokens: Annotated[int, typer.Option(help="New tokens per prompt at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1: off).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats (1: off).")] = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this text appears; repeatable.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they come (single prompt).")] = True,
    adapter: Annotated[Optional[Path], typer.Option(help="A LoRA adapter directory to apply to the model.")] = None,
    reference_path: Annotated[bool, typer.Option(help="Decode through the PyTorch model, not the native fast path (for checking).")] = False,
    tp: Annotated[int, typer.Option("--tp", help="Split the model over N processes on this machine (tensor parallel; launches torchrun).")] = 1,
    prefill_chunk: Annotated[int, typer.Option(help="Prefill prompts this many tokens at a time, bounding a long prompt's memory (0: whole).")] = 512,
    kv_cache_dtype: Annotated[str, typer.Option(help="auto (the model's dtype) or int8 (keys/values int8 with per-vector scales; decodes through PyTorch).")] = "auto",
):
    """Continue prompts with the model (KV-cache decoding; one prompt takes the native fast path)."""
    import os

    from lmforge.config import from_flags
    from lmforge.infer.sampling import SamplingParams

    params = from_flags(SamplingParams, SAMPLING_FLAGS, max_new_tokens=max_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, stop=stop or [], seed=seed)
    if tp < 1:
        raise LmforgeError("--tp must be at least 1")
    if tp > 1:
        if adapter is not None:
            raise LmforgeError("--tp does not apply --adapter; merge it first (lmforge merge) and generate from that")
        if "WORLD_SIZE" not in os.environ:
            from lmforge.train.distributed import launch

            raise typer.Exit(launch(tp, sys.argv[1:], signal_ranks=True))
        from lmforge.serve.tensor_parallel import generate_split

        def complete(prompts, on_text=None):  # None on ranks other than 0, which print nothing
            return generate_split(model, tp, prompts, params, on_text)
        shows = os.environ.get("RANK") == "0"
    else:
        m = _load_with_adapter(model, adapter)
        m.check_generates()

        def complete(prompts, on_text=None):
            return m.complete(prompts, on_text=on_text, native=not reference_path, prefill_chunk=prefill_chunk or None,
                              kv_cache_dtype=kv_cache_dtype, **params.model_dump())
        shows = True
    if stream and len(prompt) == 1:
        if shows:
            print_model_text(console, (prompt[0], "bold"), end="")
        complete(prompt, on_text=lambda row, text: print_model_text(console, text, end=""))
        if shows:
            console.print()
        return
    for p, c in zip(prompt, complete(prompt) or []):
        print_model_text(console, (p, "bold"), c.text)
        console.rule(style="dim")


def chat(
    model: Annotated[Path, typer.Argument(help="A model directory.")],
    system: Annotated[Optional[str], typer.Option(help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option(help="New tokens per reply at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.9,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="A LoRA adapter directory to apply to the model.")] = None,
    reference_path: Annotated[bool, typer.Option(help="Decode through the PyTorch model, not the native fast path (for checking).")] = False,
):
    """A simple terminal chat through the model's chat template. Empty line or Ctrl-D quits."""
    from lmforge.config import from_flags
    from lmforge.data.chat_template import end_of_turn_ids
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams

    m = _load_with_adapter(model, adapter)
    m.check_generates()
    params = from_flags(SamplingParams, SAMPLING_FLAGS, max_new_tokens=max_tokens, temperature=temperature,
                        top_p=top_p, seed=seed)
    turn_end = end_of_turn_ids(m.tokenizer)  # a special token: stopped on by id, it never shows as text
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = console.input("[bold cyan]you> [/]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line.strip():
            return
        messages.append({"role": "user", "content": line})
        prompt = m.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = m.tokenizer.encode(prompt)[-(m.config.context - 1):]
        console.print("[bold green]model> [/]", end="")
        (reply,) = generate(m.model, m.tokenizer, [ids], params, stop_token_ids=turn_end,
                            on_text=lambda r, t: print_model_text(console, t, end=""),
                            native=not reference_path)
        console.print()
        messages.append({"role": "assistant", "content": reply.text})


def serve(
    model: Annotated[Path, typer.Argument(help="A model directory.")],
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs API keys.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File of API keys, one a line (or set LMFORGE_API_KEYS).")] = None,
    allow_no_auth: Annotated[bool, typer.Option(help="Serve a non-loopback address without keys (behind an authenticating proxy).")] = False,
    served_model_name: Annotated[Optional[str], typer.Option(help="Model name clients send (default: the directory name).")] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together.")] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a slot; more get 503.")] = 256,
    requests_per_minute: Annotated[Optional[float], typer.Option(help="Per API key.")] = None,
    tokens_per_minute: Annotated[Optional[float], typer.Option(help="Per API key (prompt + max_tokens, reserved up front).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 4096,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 1 << 20,
    max_embedding_inputs: Annotated[int, typer.Option(help="Inputs one /v1/embeddings, /v1/classify or /v1/tag request may hold.")] = 2048,
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="Allow this browser origin (repeatable; none by default).")] = None,
    allowed_hosts: Annotated[Optional[list[str]], typer.Option(help="Host names clients may use besides loopback ones (repeatable; * for any).")] = None,
    header_timeout: Annotated[float, typer.Option(help="Seconds for a request's headers to arrive.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds for a request's body to arrive.")] = 30.0,
    keep_alive_timeout: Annotated[float, typer.Option(help="Seconds an idle connection stays open.")] = 5.0,
    max_connections: Annotated[int, typer.Option(help="Open connections; more are answered 503.")] = 512,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for the model (default: torch's choice).")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option(help="NAME=DIR: serve a LoRA adapter beside the model, for requests with \"model\": NAME (repeatable); DIR alone: fold it into the weights.")] = None,
    adapter_root: Annotated[Optional[Path], typer.Option(help="Directory POST /admin/adapters may load adapters from (default: none, run-time loading off).")] = None,
    reference_path: Annotated[bool, typer.Option(help="Decode through the PyTorch model, not the native fast path (for checking).")] = False,
    prefix_cache_mb: Annotated[float, typer.Option(help="Memory for the keys and values of shared prompt prefixes (MiB).")] = 256.0,
    prefix_cache: Annotated[bool, typer.Option(help="Reuse shared prompt prefixes (--no-prefix-cache: compute every prompt whole).")] = True,
    prefill_chunk: Annotated[int, typer.Option(help="Prefill long prompts this many tokens at a time, bounding their memory (0: whole).")] = 512,
    kv_cache_dtype: Annotated[str, typer.Option(help="auto (the model's dtype) or int8 (the batch slots' keys/values int8 with per-vector scales, about a quarter of fp32's memory; decodes through PyTorch).")] = "auto",
    speculative: Annotated[Optional[str], typer.Option(help="Draft tokens for a lone request: 'ngram' (prompt lookup).")] = None,
    speculative_tokens: Annotated[int, typer.Option(help="Draft tokens checked per step (with --speculative or --draft).")] = 5,
    draft: Annotated[Optional[Path], typer.Option(help="A small model directory of the same tokenizer that drafts tokens.")] = None,
    tp: Annotated[int, typer.Option("--tp", help="Split the model over N processes on this machine (tensor parallel; launches torchrun).")] = 1,
    ray: Annotated[bool, typer.Option("--ray", help="Run as replicas on Ray Serve behind its HTTP proxy (needs Ray Serve: lmforge's cluster extra).", rich_help_panel="Replicas on Ray Serve")] = False,
    replicas: Annotated[Optional[int], typer.Option(help="Replicas to run (default 1; with --autoscale-max, to start with).", rich_help_panel="Replicas on Ray Serve")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster ('auto': the one `ray start` made on this machine); default: start a local Ray.", rich_help_panel="Replicas on Ray Serve")] = None,
    autoscale_min: Annotated[Optional[int], typer.Option(help="Autoscaling: fewest replicas (default 1).", rich_help_panel="Replicas on Ray Serve")] = None,
    autoscale_max: Annotated[Optional[int], typer.Option(help="Autoscaling: most replicas (turns autoscaling on).", rich_help_panel="Replicas on Ray Serve")] = None,
    target_ongoing_requests: Annotated[Optional[float], typer.Option(help="Autoscaling: requests in flight per replica to aim for (default: --max-batch).", rich_help_panel="Replicas on Ray Serve")] = None,
    upscale_delay: Annotated[Optional[float], typer.Option(help="Autoscaling: seconds of load above target before a replica is added (default 30).", rich_help_panel="Replicas on Ray Serve")] = None,
    downscale_delay: Annotated[Optional[float], typer.Option(help="Autoscaling: seconds of load below target before a replica is removed (default 600).", rich_help_panel="Replicas on Ray Serve")] = None,
):
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at /."""
    from lmforge.serve.command import ray_options
    from lmforge.serve.command import serve as run_server

    cluster = ray_options(ray, replicas=replicas, address=ray_address, autoscale_min=autoscale_min,
                          autoscale_max=autoscale_max, target_ongoing_requests=target_ongoing_requests,
                          upscale_delay=upscale_delay, downscale_delay=downscale_delay)
    run_server(model, host, port, api_key_file, allow_no_auth, ray=cluster, device=device, threads=threads, adapter=adapter,
               adapter_root=adapter_root, tp=tp, settings={
        "model_name": served_model_name, "max_batch": max_batch, "max_queue": max_queue,
        "requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute,
        "max_tokens": max_tokens, "max_body_bytes": max_body_bytes, "max_embedding_inputs": max_embedding_inputs, "cors_origins": cors_origin or [],
        "allowed_hosts": allowed_hosts or [], "header_timeout": header_timeout, "body_timeout": body_timeout,
        "keep_alive_timeout": keep_alive_timeout, "max_connections": max_connections,
        "native_decode": not reference_path, "prefix_cache_mb": prefix_cache_mb if prefix_cache else 0.0,
        "prefill_chunk": prefill_chunk, "kv_cache_dtype": kv_cache_dtype,
        "speculative": speculative, "speculative_tokens": speculative_tokens, "draft": str(draft) if draft else None})


def evaluate(
    model: Annotated[Optional[Path], typer.Argument(help="A model directory (or, to compare saved runs, a results JSON).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="A UTF-8 text file, or a directory made by `lmforge data prepare`.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    max_batches: Annotated[Optional[int], typer.Option(help="Evaluate at most this many batches.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    tasks: Annotated[Optional[list[Path]], typer.Option(help="A JSONL task file (multiple choice, generation, code, extraction, minimal pairs, perplexity) or a built-in task (pycode, bias-pairs-en, bias-pairs-zh, ...); repeatable.")] = None,
    compare: Annotated[Optional[list[Path]], typer.Option(help="Also evaluate this model on the tasks, side by side; or a results JSON (--out) to compare with, each cell's difference from the first column shown; repeatable.")] = None,
    num_fewshot: Annotated[int, typer.Option(help="Solved examples put before each task prompt.")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate the first N examples of each task.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the task results JSON here, what the model wrote per example to OUT_STEM.examples/TASK.jsonl, and the HTML report to OUT_STEM.html.")] = None,
    perturb: Annotated[Optional[str], typer.Option(help="Also run each task on perturbed inputs and report the drop: typos,fullwidth,paraphrase,case,punct (comma-separated; paraphrase needs the task file's 'paraphrases').")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write the self-contained HTML report here (tables, plots, worst examples; with results JSONs to compare, the comparison).")] = None,
):
    """Perplexity and bits-per-byte on a text file or prepared split (--data), or benchmark tasks (--tasks)."""
    import lmforge

    entries = [*([model] if model else []), *(compare or [])]
    if tasks or (entries and all(p.suffix == ".json" for p in entries)):
        from lmforge.eval.tasks import eval_command

        if not entries:
            raise LmforgeError("lmforge eval --tasks needs a model directory: lmforge eval MODEL --tasks FILE.jsonl")
        return eval_command(entries, tasks, num_fewshot, batch_size, limit, out, as_json, console, perturb, report)
    if model is None:
        raise LmforgeError("lmforge eval needs a model directory (or results JSONs to compare: --compare A.json --compare B.json)")
    if data is None:
        raise LmforgeError("lmforge eval needs --data FILE_OR_DIR (perplexity) or --tasks FILE.jsonl (benchmarks)")
    from lmforge.data.loader import TokenSplit
    from lmforge.eval.perplexity import PSEUDO, encoder_mask_id, evaluate_split, evaluate_text

    m = lmforge.load(model)
    if data.is_dir():
        split = TokenSplit(data, "val")
        if split.vocab_size > m.config.vocab:
            raise LmforgeError(f"{data} was tokenized with a larger vocabulary than {model} has; "
                               "prepare it with the model's tokenizer (--tokenizer MODEL)")
        result = evaluate_split(m.model, split, batch_size=batch_size, max_batches=max_batches,
                                mask_id=encoder_mask_id(m.model, m.tokenizer))
    else:
        result = evaluate_text(m.model, m.tokenizer, data, batch_size=batch_size)
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        note = (" (a masked-LM encoder: each token masked in turn and predicted from both sides; "
                "not comparable with a causal model's perplexity)") if result.measure == PSEUDO else ""
        console.print(f"{result.tokens:,} tokens: loss {result.loss:.4f} nats/token, {result.measure} "
                      f"{result.perplexity:.3f}, {result.bits_per_byte:.4f} bits/byte{note}")


def extract(
    model: Annotated[Path, typer.Argument(help="A model directory trained to write triples (e.g. the relation-extraction recipe's).")],
    input: Annotated[Path, typer.Option("--input", help="Documents, JSONL: one object a line with the text and an id.")],
    out: Annotated[Path, typer.Option(help="The graph to write: NAME.jsonld (JSON-LD) or NAME.csv (source,relation,target,doc_id).")],
    text_field: Annotated[str, typer.Option(help="The JSONL field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="The JSONL field holding the document's id (else its line number).")] = "id",
    template: Annotated[str, typer.Option(help="The prompt; {text} is replaced by the document.")] = "{text}\nTriples:",
    constrained: Annotated[bool, typer.Option(help="Decode under the triples JSON schema (every finished output parses).")] = False,
    max_tokens: Annotated[int, typer.Option(help="New tokens at most per document.")] = 96,
    batch_size: Annotated[int, typer.Option(help="Documents decoded together.")] = 16,
):
    """Entity-relation triples from documents, as a knowledge graph (JSON-LD or a CSV edge list)."""
    from lmforge.eval.extract import extract_command

    extract_command(model, input, out, text_field, id_field, template, constrained, max_tokens, batch_size, console)


def explain(
    model: Annotated[Path, typer.Argument(help="A model directory.")],
    prompt: Annotated[str, typer.Option(help="The text to explain (its predicted next token).")],
    out: Annotated[Path, typer.Option(help="The HTML report to write.")] = Path("report.html"),
    steps: Annotated[int, typer.Option(help="Integrated-gradients quadrature points to start from (doubled, up to 8x, while the attributions miss the score difference by over 0.1%).")] = 32,
    top_k: Annotated[int, typer.Option(help="Tokens listed per prediction and logit-lens row.")] = 5,
):
    """Attention maps, token attributions and a logit lens for one prompt, as a self-contained HTML report."""
    from lmforge.explain.report import explain_command

    explain_command(model, prompt, out, steps, top_k, console)


def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (runs/NAME); several are overlaid.")],
    out: Annotated[Path, typer.Option(help="Directory for the PNGs.")] = Path("plots"),
):
    """Loss, learning rate, gradient norm and throughput curves, with each run's compute summary."""
    from lmforge.explain.dashboard import plot_command

    plot_command(runs, out, console)


# ----------------------------------------------------------------------------- the verbs

@dataclass(frozen=True)
class Verb:
    name: str
    command: Callable
    loads_model: bool = False  # takes --key-file/--key-env: the key of an encrypted model directory
    overrides: bool = False  # unknown `--section.key value` flags reach the command (ctx.args)


COMMANDS = [
    Verb("quickstart", quickstart),
    Verb("train", train, overrides=True),
    Verb("generate", generate, loads_model=True),
    Verb("chat", chat, loads_model=True),
    Verb("serve", serve, loads_model=True),
    Verb("eval", evaluate, loads_model=True),
    Verb("extract", extract, loads_model=True),
    Verb("explain", explain, loads_model=True),
    Verb("plot", plot),
    Verb("import", interop.import_),
    Verb("export", interop.export, loads_model=True),
    Verb("verify", interop.verify),
    Verb("encrypt", interop.encrypt),  # takes its own key options: the key to seal with
    Verb("decrypt", interop.decrypt),
    Verb("hpo", training.hpo, overrides=True),
    Verb("estimate", estimate, overrides=True),
    Verb("quantize", compress.quantize, loads_model=True),
    Verb("prune", compress.prune, loads_model=True),
    Verb("distill", compress.distill, loads_model=True),
    Verb("compare", compress.compare, loads_model=True),
    Verb("merge", training.merge, loads_model=True),
    Verb("export-checkpoint", training.export_checkpoint),
    Verb("finetune", training.finetune, loads_model=True, overrides=True),
    Verb("classify", predict.classify, loads_model=True),
    Verb("tag", predict.tag, loads_model=True),
]
DATA_COMMANDS = [  # lmforge data <verb>
    Verb("prepare", data_prepare),
    Verb("clean", clean_command),
]


def _add(group: typer.Typer, verb: Verb) -> None:
    command = interop.with_model_key(verb.command) if verb.loads_model else verb.command
    settings = {"allow_extra_args": True, "ignore_unknown_options": True} if verb.overrides else None
    group.command(verb.name, context_settings=settings)(command)


app = typer.Typer(help="lmforge: data -> tokenizer -> pretrain -> adapt -> compress -> export -> serve -> evaluate.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.callback()(_options)
data_app = typer.Typer(help="Prepare and clean corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")
for _verb in COMMANDS:
    _add(app, _verb)
for _verb in DATA_COMMANDS:
    _add(data_app, _verb)


def main() -> None:
    try:
        app()
    except LmforgeError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(EXIT_USER_ERROR)
    except TrainingInterrupted as e:
        err_console.print(f"[yellow]{e}[/]", highlight=False)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
