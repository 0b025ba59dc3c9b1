"""`lmforge serve MODEL`: load a model directory and serve it with uvicorn."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from lmforge.config import from_flags
from lmforge.errors import LmforgeError
from lmforge.serve.security import KEYS_ENV, ApiKeys, is_loopback
from lmforge.serve.settings import FLAGS, ServeSettings


def build_app(model_dir: str | Path, settings: ServeSettings, device: str = "cpu", adapter: str | Path | None = None,
              adapters: list[tuple[str, Path]] = (), adapter_root: Path | None = None, loaded=None,
              prefix_cache_type: type | None = None):
    """The app for `model_dir`: `adapter` is folded into its weights; `adapters` (name, directory)
    are served beside it, requests naming one decoding with it; POST /admin/adapters may load
    more from under `adapter_root`. `loaded`: the model, already loaded (split over processes
    under --tp, with the `prefix_cache_type` that keeps their caches alike)."""
    import lmforge
    from lmforge.infer.engine import Engine
    from lmforge.infer.prefix_cache import PrefixCache
    from lmforge.serve.app import create_app

    m = loaded or lmforge.load(model_dir, device=device)
    m.check_generates()  # an encoder would start and then fail every request
    if adapter is not None:  # a LoRA adapter, folded into the weights: no cost per token
        from lmforge.adapters import apply_adapter

        apply_adapter(m, adapter, merge=True)
    prefix_cache = (prefix_cache_type or PrefixCache)(int(settings.prefix_cache_mb * 2**20)) \
        if settings.prefix_cache_mb else None
    engine = Engine(m.model, m.tokenizer, max_batch=settings.max_batch, max_queue=settings.max_queue,
                    native=settings.native_decode, prefix_cache=prefix_cache, speculator=speculator(m, settings, device),
                    prefill_chunk=settings.prefill_chunk or None, kv_cache_dtype=settings.kv_cache_dtype)
    app = create_app(engine, settings, [Path(model_dir)] + ([Path(adapter)] if adapter is not None else []))
    app.state.engine = engine
    registry = app.state.adapters
    registry.loaded = m
    if adapter_root is not None:
        if not Path(adapter_root).is_dir():
            raise LmforgeError(f"--adapter-root {adapter_root} is not a directory")
        registry.root = Path(adapter_root).resolve()
    for name, path in adapters:
        registry.load(name, path)
    return app


def speculator(m, settings: ServeSettings, device: str):
    """The drafter the settings ask for, or None."""
    from lmforge.infer.speculative import Speculator

    if settings.speculative == "ngram":
        return Speculator.ngram(settings.speculative_tokens)
    if settings.draft is None:
        return None
    import lmforge

    draft = lmforge.load(settings.draft, device=device)
    if draft.tokenizer.vocab_size != m.tokenizer.vocab_size or \
            draft.tokenizer.encode("Hello, world! 你好") != m.tokenizer.encode("Hello, world! 你好"):
        raise LmforgeError(f"the draft model {settings.draft} has another tokenizer than the model: "
                           "--draft needs a model of the same family and tokenizer")
    return Speculator.draft_model(draft.model, m.model, settings.speculative_tokens)


def decode_path(engine) -> str:
    """What runs the decoding steps, in words (the startup log says it)."""
    from lmforge.infer.native_decode import why_not

    if engine.native is not None:
        return "native fast path (lmforge/native/decode.c)"
    if hasattr(engine.model, "new_slot_cache"):
        return "PyTorch, the model split over the --tp processes"
    if engine.kv_cache_dtype != "auto":
        return f"PyTorch ({engine.kv_cache_dtype} KV cache: the native decoder reads fp32 caches)"
    reason = why_not(engine.model) or "--reference-path given"
    return f"PyTorch reference path ({reason})"


def split_adapters(values: Path | list[str] | None) -> tuple[Path | None, list[tuple[str, Path]]]:
    """--adapter's values: (the one DIR to fold into the weights, or None; the NAME=DIR pairs to serve)."""
    from lmforge.serve.adapters_registry import parse_adapter_flag

    if values is None or isinstance(values, (str, Path)):
        return (None if values is None else Path(values)), []
    merged = [Path(v) for v in values if "=" not in v]
    if len(merged) > 1:
        raise LmforgeError("--adapter DIR (folded into the weights) may be given once; serve several as "
                           "--adapter NAME=DIR")
    return (merged[0] if merged else None), [parse_adapter_flag(v) for v in values if "=" in v]


def ray_options(enabled: bool, **flags):
    """`ray_deploy.RayOptions` for --ray and its flags (replicas, address, autoscale_min, ...), or None
    without --ray; its flags without it are refused rather than ignored."""
    given = [f"--{'ray-address' if name == 'address' else name.replace('_', '-')}"
             for name, value in flags.items() if value is not None]
    if not enabled:
        if given:
            raise LmforgeError(f"{', '.join(given)}: these set up Ray Serve replicas; add --ray")
        return None
    from lmforge.serve.ray_deploy import RAY_FLAGS, RayOptions

    return from_flags(RayOptions, RAY_FLAGS, **flags)


def log_access_to_stderr() -> None:
    """The access log (one JSON line a request) goes to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("lmforge.serve.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


def replica_app(model_dir: str, settings: ServeSettings, device: str, adapter: str | None,
                adapters: list[tuple[str, str]] = (), key_file: str | None = None, key_env: str | None = None):
    """What one Ray Serve replica runs (`serve --ray`): this command's app, its access log on the replica's
    stderr. An encrypted model's key is read here, from the file or environment variable the command read
    it from, so that only their names travel through Ray."""
    from lmforge.interop.crypto import command_key, read_key

    log_access_to_stderr()
    with command_key(read_key(key_file, key_env) if key_file or key_env else None):
        return build_app(model_dir, settings, device, adapter, [(name, Path(path)) for name, path in adapters])


def ray_replica_app(model_dir: Path, settings: ServeSettings, device: str, adapter: Path | None,
                    adapters: list[tuple[str, Path]]) -> functools.partial:
    """`replica_app` with this command's arguments, as the picklable call each replica makes: absolute
    paths (a replica may start in another directory, or on another machine), no secret in it."""
    from lmforge.interop.crypto import ENCRYPTION_FILE, check_key, command_key_source

    if not Path(model_dir).is_dir():  # before Ray starts: a replica would fail only after seconds
        raise LmforgeError(f"model directory {model_dir} not found")
    if (Path(model_dir) / ENCRYPTION_FILE).is_file():
        check_key(Path(model_dir), None)  # no key or a wrong one: one line now, not three failed replicas
    key_file, key_env = command_key_source()
    return functools.partial(replica_app, str(Path(model_dir).resolve()), settings, device,
                             str(Path(adapter).resolve()) if adapter is not None else None,
                             [(name, str(Path(path).resolve())) for name, path in adapters],
                             str(Path(key_file).resolve()) if key_file is not None else None, key_env)


def serve(model_dir: Path, host: str, port: int, api_key_file: Path | None, allow_no_auth: bool,
          settings: dict, device: str = "cpu", threads: int | None = None, log_level: str = "info",
          adapter: Path | list[str] | None = None, ray=None, adapter_root: Path | None = None, tp: int = 1) -> None:
    """Serve `model_dir` on host:port; with `ray` (a `ray_deploy.RayOptions`), as replicas on Ray Serve;
    with `tp` > 1, split over that many processes (`serve_split`).
    `adapter`: a LoRA adapter directory to fold in, or --adapter values (NAME=DIR: served beside the base)."""
    adapter, adapters = split_adapters(adapter)
    if threads is not None and threads < 1:
        raise LmforgeError("--threads must be at least 1")
    keys = ApiKeys.load(api_key_file)
    if not keys and not is_loopback(host) and not allow_no_auth:
        raise LmforgeError(f"refusing to listen on {host} without API keys: give --api-key-file FILE or set "
                           f"{KEYS_ENV} (or --allow-no-auth, if something in front of the server checks them)")
    if not settings.get("model_name"):
        settings["model_name"] = Path(model_dir).resolve().name
    if ray is not None and settings.get("draft"):  # replicas may start in another directory
        settings["draft"] = str(Path(settings["draft"]).resolve())
    config = from_flags(ServeSettings, FLAGS, api_keys=keys, **settings)
    if tp != 1:
        refuse_with_tp(tp, ray=ray is not None, speculative=config.speculative is not None,
                       draft=config.draft is not None, adapter=adapter is not None or bool(adapters),
                       adapter_root=adapter_root is not None, kv_cache_dtype=config.kv_cache_dtype != "auto")
        return serve_split(model_dir, tp, config, host, port, device, threads, log_level)
    if ray is not None:
        from lmforge.serve.ray_deploy import run

        if adapter_root is not None:
            raise LmforgeError("--adapter-root cannot be used with --ray: an adapter loaded at run time would reach "
                               "one replica only; give each adapter at start as --adapter NAME=DIR")
        return run(ray_replica_app(model_dir, config, device, adapter, adapters), config, ray, host, port, device,
                   threads)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    run_app(build_app(model_dir, config, device, adapter, adapters, adapter_root), config, host, port, log_level)


def refuse_with_tp(tp: int, **given: bool) -> None:
    """One line for --tp below 1 or with a flag the split model does not take (`given`: flag -> set)."""
    if tp < 1:
        raise LmforgeError("--tp must be at least 1")
    for flag, present in given.items():
        if present:
            raise LmforgeError(f"--tp does not support --{flag.replace('_', '-')} yet")


def serve_split(model_dir: Path, tp: int, config: ServeSettings, host: str, port: int, device: str,
                threads: int | None, log_level: str) -> None:
    """`serve --tp N`: re-run under torchrun with N processes (as generate --tp does); there, each
    holds its part of the model (serve.tensor_parallel), rank 0 serves HTTP and runs the engine,
    whose model calls it sends to the others, and they follow until it stops."""
    import os
    import signal

    import torch
    import torch.distributed as dist

    from lmforge.loaded import LoadedModel
    from lmforge.serve import tensor_parallel

    if "WORLD_SIZE" not in os.environ:
        from lmforge.train.distributed import launch

        raise SystemExit(launch(tp, sys.argv[1:], signal_ranks=True))
    config = config.model_copy(update={"native_decode": False})  # the native decoder holds whole weights
    here = tensor_parallel.join(tp, device, tensor_parallel.SERVE_TIMEOUT)
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = tensor_parallel.load_split(model_dir, here)
    if dist.get_rank() != 0:
        tensor_parallel.follow(loaded.model)
        return
    # a call that fails on this rank alone leaves the others out of step: the server stops, as on SIGTERM
    split = tensor_parallel.SplitModel(loaded.model, on_broken=lambda: os.kill(os.getpid(), signal.SIGTERM))
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn raises the signal again once it has stopped:
        signal.signal(sig, lambda signum, frame: sys.exit(0))  # a stop asked for, after which the others stop
    try:
        served = LoadedModel(split, loaded.tokenizer, loaded.path, loaded.meta)
        app = build_app(model_dir, config, str(here), loaded=served, prefix_cache_type=tensor_parallel.MirroredPrefixCache)
        run_app(app, config, host, port, log_level)
    finally:
        split.close()


def run_app(app, config: ServeSettings, host: str, port: int, log_level: str) -> None:
    """Say what is served, then serve `app` on host:port until Ctrl-C or SIGTERM."""
    import uvicorn

    from lmforge.serve.connections import uvicorn_config

    keys = config.api_keys
    log_access_to_stderr()
    auth = f"{'API keys required' if keys else 'no API keys (loopback only)'}"
    print(f"serving {config.model_name} on http://{host}:{port} ({auth}); chat page at /, API at /v1", file=sys.stderr)
    print(f"decoding: {decode_path(app.state.engine)}", file=sys.stderr)
    for name in app.state.adapters.names():
        print(f"adapter {name}: {app.state.adapters.paths[name]} (requests with \"model\": \"{name}\")", file=sys.stderr)
    heads = app.state.heads
    print(f"embeddings: {app.state.embeddings.embedder.pooling} pooling at /v1/embeddings"
          + (f"; a {heads.task} head at /v1/{heads.task}" if heads.task else ""), file=sys.stderr)
    cache = app.state.engine.prefix_cache
    print(f"prefix cache: {f'{config.prefix_cache_mb:g} MiB' if cache is not None else 'off'}", file=sys.stderr)
    if app.state.engine.speculator is not None:
        how = "prompt lookup" if config.speculative else f"draft model {config.draft}"
        print(f"speculative decoding: {how}, {config.speculative_tokens} tokens (for lone requests)", file=sys.stderr)
    server = uvicorn.Server(uvicorn_config(app, config, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    server.run()
    if not server.started:
        raise LmforgeError(f"the server could not start on {host}:{port} (see the message above)")
