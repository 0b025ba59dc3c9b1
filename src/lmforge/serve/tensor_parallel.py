"""One model split over N processes (`lmforge generate --tp N`, `lmforge serve --tp N`).

Every process (a torchrun rank) holds its tensor-parallel part of the model
(`train.tensor_parallel`: its attention heads, its slice of the MLP and of the vocabulary), read
from the model directory alone (`serve.shard_load`), and its KV caches hold only its key/value
heads. Rank 0 runs the ordinary code against `SplitModel`: the decoding loop of
`infer.generate` (the PyTorch path) for generate, the server's continuous-batching engine for
serve. `SplitModel` sends each call that touches the model or its caches (a new cache, a slot's
binding or move, a prefix-cache copy, a forward pass) to the other ranks before taking part in
it itself (those without a collective travel with the next forward); they `follow` until rank 0
says stop. Sampling, stop strings, streaming and HTTP
happen on rank 0 only, so the ranks never need to agree on anything but the calls they are sent.
The logits (and hidden states) come back whole on rank 0.

The calls reach the other ranks in the order rank 0 makes them, one at a time (`_turn`): the
engine's thread and the embeddings' worker threads both call the model. A call whose input
the model refuses (a ValueError, before its first collective) fails alike on the others, which
log it and go on.

Any other failure on rank 0 (out of memory in its forward, say) may come in the middle of the
call's collectives: the others would wait in one it never joins, and the next call would pair
with that one. So such a failure of a call with collectives ends the split model: rank 0 notes why in
the process group's store (`ABORT_KEY`), refuses every later call, asks its server to stop
(`on_broken`) and exits with that one line; its exit breaks the others' collectives, and they,
finding the note, exit without a word of their own (one line "rank 0 is gone" if there is none:
rank 0 was killed).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError
from lmforge.infer.generate import Completion, TextCallback, generate
from lmforge.infer.prefix_cache import PrefixCache
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.slots import SlotCache
from lmforge.model import Transformer
from lmforge.model.kv_cache import KVCache

# A server's other ranks wait for rank 0's next call as long as it is idle: no collective timeout.
SERVE_TIMEOUT = timedelta(days=365)

_turn = threading.RLock()  # one call (its command and rank 0's part of it) at a time
_held: list[tuple] = []  # calls without collectives (cache bindings, copies), sent with the next one that has
_broken: list[str] = []  # why the ranks are out of step, once rank 0 failed in a call they were all in
_on_broken: list = []  # what rank 0 calls then (its server's stop)
ABORT_KEY = "lmforge/tp/rank0_failed"


def _send(command: tuple) -> None:
    global _held
    commands, _held = [*_held, command], []
    dist.broadcast_object_list([commands], src=0)


def _receive() -> list[tuple]:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _mirrored(command: tuple, run_here, local_only: bool = False):
    """Send `command` to the other ranks, then run rank 0's part of it. A `local_only` call (no
    collective in it) waits to go with the next call that has one, in the same order: one
    broadcast a decoding step instead of two."""
    with _turn:
        if _broken:
            raise LmforgeError(_broken[0])
        if local_only:
            _held.append(command)
            return run_here()
        _send(command)
        try:
            return run_here()
        except ValueError:  # the input refused, on every rank, before any collective
            raise
        except Exception as e:
            _break(command[0], e)
            raise


def _break(call: str, error: Exception) -> None:
    """Rank 0 failed in `call`, which the other ranks took part in: no call may follow it."""
    why = str(error).splitlines()[0][:300] if str(error) else ""
    _broken.append(f"rank 0 failed in a {call} call the other --tp ranks took part in ({type(error).__name__}: "
                   f"{why}); the ranks are out of step, so every one stops")
    try:
        dist.distributed_c10d._get_default_store().set(ABORT_KEY, _broken[0])
    except Exception:  # no store to note it in: the others each say that rank 0 is gone
        pass
    for stop in _on_broken:
        stop()


def _rank0_failed() -> bool:
    """Whether rank 0 noted in the store that it failed (and so said why itself)."""
    try:
        return dist.distributed_c10d._get_default_store().check([ABORT_KEY])
    except Exception:  # the store went with rank 0
        return False


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor as it travels in a command (a CUDA tensor would unpickle onto rank 0's device)."""
    return None if t is None else t.cpu()


class SplitModel:
    """Rank 0's handle on the split model: what the decoding loop and the engine call."""

    def __init__(self, model: Transformer, on_broken=None):
        """`on_broken`: called (from the thread whose call failed) when a call with collectives
        fails on rank 0 and the split model is unusable: a server stops on it."""
        self.model, self.config, self.tok_emb = model, model.config, model.tok_emb
        if on_broken is not None:
            _on_broken.append(on_broken)

    def eval(self) -> "SplitModel":
        return self

    def parameters(self):
        return self.model.parameters()

    def buffers(self):
        return self.model.buffers()

    def __deepcopy__(self, memo) -> "SplitModel":
        # the serve app's shared copy (a module tree free of the engine's LoRA hooks): a split model
        # never gets those hooks (--tp refuses adapters), so it is its own copy
        return self

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        return _mirrored(("cache", batch, capacity), lambda: _local_cache(self.model, batch, capacity),
                         local_only=True)

    def new_slot_cache(self, slots: int, capacity: int | None = None) -> "MirroredSlots":
        """The engine's slot cache: this rank's key/value heads, bound and moved alike on every rank."""
        return _mirrored(("slots", slots, capacity), lambda: _local_slots(self.model, slots, capacity, MirroredSlots),
                         local_only=True)

    def __call__(self, input_ids: torch.Tensor, kv_cache: KVCache | SlotCache | None = None,
                 pad_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        return _mirrored(("forward", _cpu(input_ids), _cpu(pad_mask), last_only),
                         lambda: _forward(self.model, input_ids, kv_cache, pad_mask, last_only))

    def hidden_states(self, input_ids: torch.Tensor, kv_cache=None, pad_mask=None,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states of rows without a cache (what embeddings and task heads read)."""
        if kv_cache is not None or pad_mask is not None:
            raise LmforgeError("a split model computes hidden states without a KV cache only")
        return _mirrored(("hidden", _cpu(input_ids), _cpu(segment_ids)),
                         lambda: _hidden(self.model, input_ids, segment_ids))

    def close(self) -> None:
        """Let the other ranks return (they may already be gone: stopped by torchrun with this one).
        If a call failed on rank 0 in the middle of theirs, nothing more can be sent: say why in
        one line (the failure itself, raised where it happened, was answered as an error)."""
        with _turn:
            if _broken:
                raise LmforgeError(_broken[0])
            try:
                _send(("stop",))
            except RuntimeError:
                pass


class MirroredSlots(SlotCache):
    """Rank 0's slot cache: each binding and move reaches the other ranks' caches before the next forward."""

    def bind_prefill(self, slot: int, t: int, start: int = 0) -> None:
        _mirrored(("slots.bind_prefill", slot, t, start),
                  lambda: super(MirroredSlots, self).bind_prefill(slot, t, start), local_only=True)

    def bind_decode(self, n: int) -> None:
        _mirrored(("slots.bind_decode", n), lambda: super(MirroredSlots, self).bind_decode(n), local_only=True)

    def move(self, src: int, dst: int) -> None:
        _mirrored(("slots.move", src, dst), lambda: super(MirroredSlots, self).move(src, dst), local_only=True)


class MirroredPrefixCache(PrefixCache):
    """Rank 0's prefix cache: every rank keeps the same blocks of its own key/value heads, so a
    lookup copies the same prefix into the same slot everywhere."""

    def __init__(self, budget_bytes: int):
        _mirrored(("prefix", budget_bytes), lambda: None, local_only=True)
        super().__init__(budget_bytes)

    def lookup(self, lane, tokens, keys, values, slot) -> int:
        return _mirrored(("prefix.lookup", lane, tokens, slot), lambda: super(MirroredPrefixCache, self).lookup(
            lane, tokens, keys, values, slot), local_only=True)

    def store(self, lane, tokens, keys, values, slot) -> None:
        _mirrored(("prefix.store", lane, tokens, slot), lambda: super(MirroredPrefixCache, self).store(
            lane, tokens, keys, values, slot), local_only=True)


class _Follower:
    """A rank other than 0: its model, its caches, and the calls that act on them."""

    def __init__(self, model: Transformer):
        self.model = model
        self.device = model.tok_emb.weight.device
        self.cache: KVCache | SlotCache | None = None
        self.prefix: PrefixCache | None = None

    def here(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.device)

    def run(self, command: tuple) -> None:
        name, *args = command
        if name == "cache":
            self.cache = _local_cache(self.model, *args)
        elif name == "slots":
            self.cache = _local_slots(self.model, *args, SlotCache)
        elif name.startswith("slots."):
            getattr(self.cache, name.removeprefix("slots."))(*args)
        elif name == "prefix":
            self.prefix = PrefixCache(*args)
        elif name.startswith("prefix."):
            lane, tokens, slot = args
            getattr(self.prefix, name.removeprefix("prefix."))(lane, tokens, self.cache.k, self.cache.v, slot)
        elif name == "forward":
            input_ids, pad_mask, last_only = args
            _forward(self.model, self.here(input_ids), self.cache, self.here(pad_mask), last_only)
        elif name == "hidden":
            _hidden(self.model, self.here(args[0]), self.here(args[1]))
        else:
            raise ValueError(f"unknown command {name!r}")


def follow(model: Transformer) -> None:
    """Ranks other than 0: run what rank 0's `SplitModel` is asked, until it closes. Ctrl-C and
    SIGTERM are rank 0's to act on: it stops, then tells these to (should it die instead, the
    next receive fails and they end)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    follower = _Follower(model)
    while True:
        try:
            commands = _receive()
        except RuntimeError as e:
            _lost(e)
        for command in commands:
            if command[0] == "stop":
                return
            try:
                follower.run(command)
            except Exception as e:  # rank 0 met the same error and answered its request with it, or is gone
                if isinstance(e, dist.DistError) or _rank0_failed():
                    _lost(e)
                print(f"lmforge rank {dist.get_rank()}: {command[0]}: {type(e).__name__}: {e}", file=sys.stderr)


def _lost(error: Exception):
    """A rank other than 0 lost rank 0: it ends, silently if rank 0 said why, else in one line."""
    if _rank0_failed():
        raise SystemExit(1)
    raise LmforgeError(f"rank {dist.get_rank()}: rank 0 is gone ({str(error).splitlines()[0][:200]})") from None


def _local_cache(model: Transformer, batch: int, capacity: int | None) -> KVCache:
    """A cache of this rank's key/value heads only."""
    cfg, p = model.config, model.tok_emb.weight
    return KVCache(cfg.n_layer, batch, cfg.kv_heads // dist.get_world_size(), cfg.dim_head, capacity or cfg.context,
                   p.dtype, p.to_local().device)


def _local_slots(model: Transformer, slots: int, capacity: int | None, kind: type[SlotCache]) -> SlotCache:
    cfg, p = model.config, model.tok_emb.weight
    return kind(cfg.n_layer, slots, cfg.kv_heads // dist.get_world_size(), cfg.dim_head, capacity or cfg.context,
                p.dtype, p.to_local().device)


@torch.inference_mode()
def _forward(model, input_ids, cache, pad_mask, last_only) -> torch.Tensor:
    return model(input_ids, cache, pad_mask=pad_mask, last_only=last_only).full_tensor()


@torch.inference_mode()
def _hidden(model, input_ids, segment_ids) -> torch.Tensor:
    h = model.hidden_states(input_ids, segment_ids=segment_ids)
    return h.full_tensor() if hasattr(h, "full_tensor") else h


def join(tp: int, device: str = "cpu", timeout: timedelta | None = None) -> torch.device:
    """Join torchrun's process group of `tp` processes (gloo on CPU, NCCL on CUDA); this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise LmforgeError(f"--tp {tp} needs {tp} processes, but torchrun started {world}; "
                           f"run it without torchrun, or with --nproc_per_node {tp}")
    kind = torch.device(device).type
    here = torch.device("cpu")
    if kind == "cuda":
        here = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(here)
    elif kind != "cpu":
        raise LmforgeError(f"--tp runs on cpu or cuda, not {device}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=timeout)
    return here


def load_split(model_dir, device: torch.device):
    """This rank's part of the model of `model_dir` (a LoadedModel whose model is split)."""
    from lmforge.serve.shard_load import load_shard

    loaded = load_shard(model_dir, device)
    loaded.check_generates()
    return loaded


def generate_split(model_dir, tp: int, prompts: list[str], params: SamplingParams,
                   on_text: TextCallback | None = None) -> list[Completion] | None:
    """Under torchrun with `tp` processes: the model of `model_dir` split over them, and the
    prompts' completions on rank 0 (None on the others, which only follow)."""
    loaded = load_split(model_dir, join(tp))
    if dist.get_rank() != 0:
        follow(loaded.model)
        return None
    driver = SplitModel(loaded.model)
    try:
        return generate(driver, loaded.tokenizer, prompts, params, on_text, native=False)
    finally:
        driver.close()
