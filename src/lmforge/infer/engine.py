"""A continuous-batching generation engine: what the HTTP server runs.

One background thread owns the model. At every decoding step it admits waiting requests
into free cache slots, samples one token for every running sequence with that sequence's
own parameters and random generator, streams what is new, retires the sequences that
finished or were cancelled, and runs one batched forward over the rest. With the native
decoder, a new short prompt rides in that same forward (its tokens are extra rows of the
step, each attending to the ones before it); otherwise it is prefilled alone, as
`generate` does it. So requests join and leave the running batch at every step, and a
lone request gives the same tokens as `lmforge.infer.generate.generate`.

Callers on any thread `submit` requests and get events through a callback; `stream` is
the asyncio form. The waiting queue is bounded: past `max_queue` a submit raises
`EngineOverloaded` at once (the server answers 503) instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.infer.chunked_prefill import DEFAULT_PREFILL_CHUNK, check_chunk, prefill
from lmforge.infer.generate import RowText
from lmforge.infer.grammar import Constraint, Masks, apply_mask, grammar_tokenizer
from lmforge.infer.lora_batch import LoraAdapter, rows_with_adapters
from lmforge.infer.native_decode import NativeDecoder
from lmforge.infer.prefix_cache import PrefixCache
from lmforge.infer.speculative import Speculator, target_probs, verify
from lmforge.infer.sampling import GREEDY_BELOW, SamplingParams, apply_repetition_penalty, sample
from lmforge.infer.slots import new_slot_cache
from lmforge.model import Transformer


# With the native decoder, a prompt of up to this many tokens is fed inside the next decoding
# step, beside the running sequences' tokens: that step reads every weight once for all of
# them, where a prefill of its own would read them all again. Longer prompts, and echo (which
# needs the logits of every prompt position), are prefilled alone by the PyTorch model.
PROMPT_IN_STEP_MAX = 64


class EngineOverloaded(LmforgeError):
    """The waiting queue is full; try again later."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    logprobs: int | None = None  # None: none; k: each sampled token's logprob and its k best alternatives
    prompt_logprobs: bool = False  # also the logprob of every prompt token given the ones before (echo)
    stop_token_ids: list[int] = field(default_factory=list)  # end tokens besides end-of-text (chat turns)
    grammar: str | None = None  # llguidance grammar the output must follow (infer.grammar)
    adapter: str | None = None  # the LoRA adapter (Engine.add_adapter's name) to decode with; None: the base


@dataclass
class Event:
    """What one step adds to one request. The last event of a request has `finish_reason`."""

    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)  # sampled this step (the end-of-text token too)
    prompt: list[TokenLogprob | None] | None = None  # first event only, when asked; the first token has None
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None


EventCallback = Callable[[Event], None]


@dataclass
class Result:
    text: str
    token_ids: list[int]  # the generated tokens, without the end-of-text token
    finish_reason: str
    tokens: list[TokenLogprob]
    prompt: list[TokenLogprob | None] | None
    completion_tokens: int  # tokens sampled, the end-of-text token included


class Sequence:
    """One request in the engine; `cancel()` from any thread retires it at the next step."""

    _ids = itertools.count()

    def __init__(self, request: Request, max_new: int, on_event: EventCallback, tokenizer: TextTokenizer):
        self.id = next(self._ids)
        self.request, self.params, self.max_new, self.on_event = request, request.params, max_new, on_event
        self.row = RowText(tokenizer, request.params.stop)
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # for the repetition penalty
        self.constraint: Constraint | None = None  # the grammar's state, for a constrained request
        self.logits: torch.Tensor | None = None  # (1, V): the distribution of the next token
        self.argmax: int | None = None  # its most likely token, when the step computed it for the batch
        self.sampled = 0
        self.pending = False  # its prompt is still to be fed, in the next step
        self.cached = 0  # how many of its prompt's first tokens came from the prefix cache
        self.residual: torch.Tensor | None = None  # (1, V): draw the next token from this (a draft was rejected)
        self.adapter: LoraAdapter | None = None  # the LoRA adapter it decodes with
        self.cancelled = False
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        self.cancelled = True


def _logprob_entry(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """logprobs (V,) -> the token's logprob and the k best alternatives."""
    top: list[tuple[int, float]] = []
    if k:
        values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)


def _merge(a: Event, b: Event) -> Event:
    """One event for two consecutive events of the same request."""
    return Event(text=a.text + b.text, tokens=a.tokens + b.tokens, prompt=a.prompt or b.prompt,
                 finish_reason=b.finish_reason or a.finish_reason, error=a.error or b.error)


class _Mailbox:
    """Hands engine events to one asyncio loop, one wake-up per engine step. Waking the loop
    is a write to its self-pipe: a system call that also hands the GIL to the loop's thread,
    which the engine must then wait to get back. Once per event, that was an eighth of the
    engine thread's time at 16 streams; so events wait here and the engine kicks every
    mailbox after each step (`Engine._kick`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, tuple[int, Event]]] = []
        self.mutex = threading.Lock()

    def post(self, queue: asyncio.Queue, item: tuple[int, Event]) -> None:
        if self.loop.is_closed():
            raise RuntimeError("the event loop is closed")  # the engine then cancels the sequence
        with self.mutex:
            self.items.append((queue, item))

    def kick(self) -> None:
        with self.mutex:
            if not self.items:
                return
            items, self.items = self.items, []
        try:
            self.loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the loop closed: nobody is left to read these
            pass

    @staticmethod
    def _deliver(items) -> None:
        for queue, item in items:
            queue.put_nowait(item)


class EventStream:
    """(index, event) pairs for several requests, in the asyncio loop that opened it. Events
    of one request that are waiting together are merged into one, so a consumer that falls
    behind (many streams, a slow client) gets fewer, larger chunks instead of a backlog.
    Leaving the `async for` early (a client that disconnected) cancels what still runs."""

    def __init__(self, engine: "Engine", requests: list[Request]):
        box = engine.mailbox(asyncio.get_running_loop())
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def callback(i: int) -> EventCallback:
            return lambda ev: box.post(self._queue, (i, ev))

        self.sequences = engine.submit_many(requests, [callback(i) for i in range(len(requests))])
        self._open = len(self.sequences)

    async def __aiter__(self) -> AsyncIterator[tuple[int, Event]]:
        try:
            while self._open:
                ready = [await self._queue.get()]
                while not self._queue.empty():
                    ready.append(self._queue.get_nowait())
                merged: dict[int, Event] = {}
                for i, ev in ready:
                    merged[i] = _merge(merged[i], ev) if i in merged else ev
                for i, ev in merged.items():
                    if ev.finish_reason is not None:
                        self._open -= 1
                    yield i, ev
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self._open:
            for s in self.sequences:
                s.cancel()


def _lane(in_step: bool, adapter: LoraAdapter | None) -> str:
    """The prefix cache's chain for keys and values computed one way: rows of a native step
    and a PyTorch prefill round differently (see prefix_cache), and each adapter (each load of
    one) makes keys and values of its own."""
    lane = "native-step" if in_step else "prefill"
    return lane if adapter is None else f"{lane}/adapter-{adapter.key}"


class Engine:
    def __init__(self, model: Transformer, tokenizer: TextTokenizer, max_batch: int = 16, max_queue: int = 256,
                 native: bool = True, prefix_cache: PrefixCache | None = None,
                 speculator: Speculator | None = None, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 kv_cache_dtype: str = "auto"):
        """`kv_cache_dtype="int8"`: keys and values stored as int8 (`slots.Int8SlotCache`); such a
        cache decodes through the PyTorch model (the native decoder reads fp32 caches)."""
        if max_batch < 1 or max_queue < 0:
            raise LmforgeError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.context = model.config.context
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = new_slot_cache(model, max_batch, kv_cache_dtype)
        self.kv_cache_dtype = kv_cache_dtype
        # Decoding steps run through the native decoder where it covers the model.
        native = native and kv_cache_dtype == "auto"
        self.native = NativeDecoder.create(model, self.cache.k, self.cache.v) if native else None
        self.device = model.tok_emb.weight.device
        self.prefix_cache = prefix_cache  # None: every prompt is computed whole
        self.speculator = speculator  # None: one token per sequence and step
        # A prompt prefilled by the PyTorch model goes in chunks of this many tokens (chunked_prefill),
        # all before the next decoding step.
        self.prefill_chunk = check_chunk(prefill_chunk)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # index == cache slot
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
        self._mailbox_lock = threading.Lock()
        self._masks: Masks | None = None  # made for the first constrained request
        self.adapters: dict[str, LoraAdapter] = {}  # LoRA adapters requests may name (add_adapter)
        self._live: list[LoraAdapter] = []  # the loaded adapters and the removed ones still in use
        self._adapter_table: list[LoraAdapter] = []  # what the native decoder holds, in its index order
        self._adapters_changed = False

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        """Where this engine leaves the events of streams read in `loop` (see _Mailbox)."""
        with self._mailbox_lock:
            box = self._mailboxes.get(loop)
            if box is None:
                box = self._mailboxes[loop] = _Mailbox(loop)
            return box

    def _kick(self) -> None:
        with self._mailbox_lock:
            boxes = list(self._mailboxes.values())
        for box in boxes:
            box.kick()

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # -- submitting ------------------------------------------------------------------------------
    def check(self, request: Request) -> int:
        """Validate a request; returns how many tokens it may generate."""
        n = len(request.prompt)
        if n == 0:
            raise LmforgeError("the prompt is empty")
        if n >= self.context:
            raise LmforgeError(f"the prompt has {n} tokens; the model's context is {self.context}: shorten it")
        vocab = self.model.config.vocab
        if any(not 0 <= t < vocab for t in request.prompt):
            raise LmforgeError(f"a prompt token id is outside the vocabulary [0, {vocab})")
        return min(request.params.max_new_tokens, self.context - n)

    def submit_many(self, requests: list[Request], on_event: list[EventCallback]) -> list[Sequence]:
        """Queue requests together (all or none: the queue bound counts them all)."""
        seqs = [Sequence(r, self.check(r), cb, self.tokenizer) for r, cb in zip(requests, on_event)]
        for seq in seqs:
            if seq.request.grammar is not None:
                seq.constraint = self._constraint(seq.request)
        with self._wake:
            if self._stopping or not self.alive:
                raise EngineOverloaded("the engine is not running")
            unknown = [r.adapter for r in requests if r.adapter is not None and r.adapter not in self.adapters]
            if unknown:
                raise LmforgeError(f"no LoRA adapter named {unknown[0]!r} is loaded")
            # Waiting requests take the free batch slots at the next step; the rest are queued.
            free = self.max_batch - len(self._running)
            if len(self._waiting) + len(seqs) - free > self.max_queue:
                busy = min(self.max_batch, len(self._running) + len(self._waiting))
                queued = max(0, len(self._waiting) - free)
                needs = f"; this request needs {len(seqs)} places" if len(seqs) > 1 else ""
                raise EngineOverloaded(f"the server is at capacity: {busy} of {self.max_batch} batch slots and "
                                       f"{queued} of {self.max_queue} queue places are taken{needs}; retry shortly")
            for seq in seqs:
                if seq.request.adapter is not None:
                    seq.adapter = self.adapters[seq.request.adapter]
                    seq.adapter.users += 1
            self._waiting.extend(seqs)
            self._wake.notify()
        return seqs

    # -- LoRA adapters ---------------------------------------------------------------------------
    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Serve `adapter` from the next step on: requests naming it decode with it."""
        with self._wake:
            if adapter.name in self.adapters:
                raise LmforgeError(f"an adapter named {adapter.name!r} is already loaded")
            self.adapters[adapter.name] = adapter
            self._live.append(adapter)
            self._adapters_changed = True

    def remove_adapter(self, name: str) -> LoraAdapter:
        """Stop taking requests for adapter `name` (LmforgeError if none); the requests that
        already use it finish with it, and its weights go once they have (`adapter.users` 0)."""
        with self._wake:
            adapter = self.adapters.pop(name, None)
            if adapter is None:
                raise LmforgeError(f"no LoRA adapter named {name!r} is loaded")
            adapter.removed = True
            self._adapters_changed = True
            return adapter

    def _release(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            with self._wake:
                seq.adapter.users -= 1
                if seq.adapter.removed and seq.adapter.users == 0:
                    self._adapters_changed = True
            seq.adapter = None

    def _sync_adapters(self) -> None:
        """The native decoder's table: the loaded adapters and the removed ones still in use."""
        with self._wake:
            if not self._adapters_changed:
                return
            self._adapters_changed = False
            self._live = table = [a for a in self._live if not (a.removed and a.users == 0)]
        self._adapter_table = list(table)
        if self.native is not None:
            self.native.set_adapters([a.layers for a in table])

    def _adapter_index(self, seq: Sequence) -> int:
        """The sequence's adapter's place in the native decoder's table (-1: none)."""
        if seq.adapter is None:
            return -1
        if seq.adapter not in self._adapter_table:  # loaded after this step's first sync
            self._sync_adapters()
        return self._adapter_table.index(seq.adapter)

    def _constraint(self, request: Request) -> Constraint:
        """A matcher for the request's grammar (GrammarError if it cannot be used), whose end
        tokens are the request's: end-of-text and its stop tokens."""
        vocab = self.model.config.vocab
        ends = tuple(dict.fromkeys(t for t in (self.tokenizer.eos_id, *request.stop_token_ids) if t is not None))
        constraint = Constraint(request.grammar, grammar_tokenizer(self.tokenizer, vocab, ends))
        with self._wake:
            if self._masks is None:
                self._masks = Masks(vocab)
        return constraint

    def submit(self, request: Request, on_event: EventCallback) -> Sequence:
        return self.submit_many([request], [on_event])[0]

    def stream(self, requests: list[Request]) -> "EventStream":
        """Submit now (so a full queue or a bad request raises here) and read events with `async for`."""
        return EventStream(self, requests)

    def generate(self, requests: list[Request], timeout: float | None = None) -> list[Result]:
        """Blocking: run requests through the engine and collect their results."""
        results: list[Result | None] = [None] * len(requests)
        parts: list[list[Event]] = [[] for _ in requests]
        done = threading.Semaphore(0)

        def callback(i: int) -> EventCallback:
            def on_event(ev: Event) -> None:
                parts[i].append(ev)
                if ev.finish_reason is not None:
                    done.release()
            return on_event

        self.submit_many(requests, [callback(i) for i in range(len(requests))])
        for _ in requests:
            if not done.acquire(timeout=timeout):
                raise TimeoutError("the engine did not finish in time")
        for i, evs in enumerate(parts):
            tokens = [t for ev in evs for t in ev.tokens]
            eos = self.tokenizer.eos_id
            results[i] = Result(text="".join(ev.text for ev in evs),
                                token_ids=[t.token for t in tokens if t.token != eos],
                                finish_reason=evs[-1].finish_reason or "error", tokens=tokens,
                                prompt=evs[0].prompt, completion_tokens=len(tokens))
        return results  # type: ignore[return-value]

    # -- the loop --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._running:
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._sync_adapters()
                    self._admit()
                    self._step()
                except Exception as e:  # a bug or an out-of-memory: fail the running requests, keep serving
                    for seq in self._running:
                        self._emit(seq, Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
                    self._running = []
                self._kick()
        finally:  # stopped, or the thread dies of what the handler above lets through: no request waits forever
            with self._wake:
                died, self._stopping = not self._stopping, True  # and no new one is queued
            for seq in [*self._running, *self._waiting]:
                self._emit(seq, Event(finish_reason="error", error="the engine's thread died") if died else
                           Event(finish_reason="cancelled"))
            self._running, self._waiting = [], deque()
            self._kick()

    def _emit(self, seq: Sequence, event: Event) -> None:
        if event.finish_reason is not None:
            seq.finish_reason = event.finish_reason
            self._release(seq)
        try:
            seq.on_event(event)
        except Exception:  # a consumer that went away (closed event loop) must not stop the engine
            seq.cancelled = True

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            with self._wake:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            if seq.cancelled:
                self._emit(seq, Event(finish_reason="cancelled"))
                continue
            try:
                self._prefill(seq, len(self._running))
            except Exception as e:  # this request alone fails (say, out of memory on a long prompt)
                self._emit(seq, Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))

    def _prefill(self, seq: Sequence, slot: int) -> None:
        req, params = seq.request, seq.params
        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
        if params.temperature > 0:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        if params.repetition_penalty != 1.0:
            seq.seen = torch.zeros(1, self.model.config.vocab, dtype=torch.bool, device=self.device)
            seq.seen[0, ids[0]] = True
        in_step = self.native is not None and not req.prompt_logprobs and len(req.prompt) <= PROMPT_IN_STEP_MAX
        if self.prefix_cache is not None and not req.prompt_logprobs:  # echo needs every prompt position's logits
            seq.cached = self.prefix_cache.lookup(_lane(in_step, seq.adapter), req.prompt, self.cache.k, self.cache.v,
                                                  slot)
        if in_step:
            self.cache.lengths[slot] = seq.cached
            seq.pending = True  # `_step` feeds the prompt with the others' next tokens
            self._running.append(seq)
            return
        with rows_with_adapters(self.model, [seq.adapter]):
            logits = prefill(self.model, ids[:, seq.cached:], self.cache, chunk=self.prefill_chunk,
                             all_logits=bool(req.prompt_logprobs),  # (1, T or 1, V)
                             bind=lambda start, t: self.cache.bind_prefill(slot, t, start=seq.cached + start))
        if self.prefix_cache is not None:
            self.prefix_cache.store(_lane(False, seq.adapter), req.prompt, self.cache.k, self.cache.v, slot)
        seq.logits = logits[:, -1].clone() if req.prompt_logprobs else logits[:, -1]
        if req.prompt_logprobs:
            lp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # (T-1, V): token t+1 given 0..t
            k = req.logprobs or 0
            prompt = [None] + [_logprob_entry(lp[t], req.prompt[t + 1], k) for t in range(len(req.prompt) - 1)]
            self._emit(seq, Event(prompt=prompt))
        self._running.append(seq)

    def _sample(self, seq: Sequence) -> int:
        if seq.residual is not None:  # the rejection rule's distribution (speculative.verify)
            residual, seq.residual = seq.residual, None
            return int(torch.multinomial(residual, 1, generator=seq.generator)[0])
        if seq.argmax is not None and seq.params.temperature == 0.0 and seq.seen is None:
            return seq.argmax  # greedy: chosen for the whole batch in one call (`_step`)
        logits = seq.logits
        if seq.seen is not None:
            logits = apply_repetition_penalty(logits, seq.seen, seq.params.repetition_penalty)
        token = int(sample(logits, seq.params, seq.generator)[0])
        if seq.seen is not None:
            seq.seen[0, token] = True
        return token

    def _next_token(self, seq: Sequence) -> Event:
        """Sample a sequence's next token: what it adds to the stream, and whether it ends it."""
        return self._token_event(seq, self._sample(seq), seq.logits)

    def _token_event(self, seq: Sequence, token: int, logits: torch.Tensor) -> Event:
        """What `token`, drawn from `logits` (1, V), adds to a sequence's stream, and whether it ends it."""
        eos = self.tokenizer.eos_id
        seq.sampled += 1
        if seq.request.logprobs is not None:
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            tokens = [_logprob_entry(lp, token, seq.request.logprobs)]
        else:
            tokens = [TokenLogprob(token, 0.0, [])]
        finish = None
        text = ""
        if token == eos or token in seq.request.stop_token_ids:
            finish = "stop"
        else:
            if seq.constraint is not None:
                seq.constraint.consume(token)
            text = seq.row.add(token)
            if seq.row.stopped:
                finish = "stop"
            elif seq.sampled >= seq.max_new:
                finish = "length"
        if finish is not None:
            text += seq.row.flush()
        return Event(text=text, tokens=tokens, finish_reason=finish)

    def _mask(self) -> None:
        """Constrained sequences' logits: -inf for the tokens their grammar does not allow next."""
        if self._masks is None:
            return
        rows = [s for s in self._running if s.constraint is not None and not s.constraint.masked
                and s.logits is not None and not s.pending]
        if not rows:
            return
        for seq, allowed in zip(rows, self._masks.allowed([s.constraint for s in rows])):
            apply_mask(seq.logits, allowed)
            seq.argmax = None  # the batch's argmax was taken before the mask
            seq.constraint.masked = True

    def _step(self) -> None:
        self._mask()
        for seq in self._running:
            if seq.cancelled:
                seq.finish_reason = "cancelled"
                self._emit(seq, Event(finish_reason="cancelled"))
                continue
            if seq.max_new == 0:
                self._emit(seq, Event(finish_reason="length"))
                continue
            if seq.pending:
                continue
            try:
                event = self._next_token(seq)
            except Exception as e:  # this sequence alone fails; the rest of the batch goes on
                event = Event(finish_reason="error", error=f"{type(e).__name__}: {e}")
            self._emit(seq, event)
        self._retire()
        # Hand this step's tokens to the event loop before the forward pass: it streams them
        # while the forward runs without the GIL, rather than after it, contending with the
        # engine's own Python for the GIL and a step late.
        self._kick()
        n = len(self._running)
        if n == 0:
            return
        if n == 1 and self._speculate(self._running[0]):
            return
        if self.native is not None:
            # One row per running sequence, and one per prompt token for those just admitted.
            tokens: list[int] = []
            positions: list[int] = []
            rows: list[int] = []
            last: list[int] = []  # each sequence's last row: its next token's logits
            for i, seq in enumerate(self._running):
                if seq.pending:
                    prompt = seq.request.prompt
                    tokens += prompt[seq.cached:]
                    positions += range(seq.cached, len(prompt))
                    rows += [i] * (len(prompt) - seq.cached)
                else:
                    tokens.append(seq.row.ids[-1])
                    positions.append(self.cache.lengths[i])
                    rows.append(i)
                last.append(len(tokens) - 1)
            adapters = None
            if any(seq.adapter is not None for seq in self._running):
                index = [self._adapter_index(seq) for seq in self._running]
                adapters = [index[i] for i in rows]
            logits = self.native.step(tokens, positions, cache_rows=rows,
                                      logits_rows=last if len(tokens) != n else None, adapters=adapters)
            for i, seq in enumerate(self._running):
                self.cache.lengths[i] = positions[last[i]] + 1
                if seq.pending and self.prefix_cache is not None:
                    self.prefix_cache.store(_lane(True, seq.adapter), seq.request.prompt, self.cache.k, self.cache.v, i)
                seq.pending = False
        else:
            last = torch.tensor([[s.row.ids[-1]] for s in self._running], dtype=torch.long, device=self.device)
            self.cache.bind_decode(n)
            with rows_with_adapters(self.model, [seq.adapter for seq in self._running]):
                logits = self.model(last, self.cache, last_only=True)[:, -1]  # (n, V)
        argmax = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(self._running):
            seq.logits, seq.argmax = logits[i:i + 1], argmax[i]

    def _speculate(self, seq: Sequence) -> bool:
        """A lone sequence's forward pass with drafts (infer.speculative): emits the drafts the
        model keeps and leaves the next token's distribution. False where it does not apply:
        no speculator, the PyTorch path (its multi-row forward rounds unlike single steps), a
        prompt still to feed, a grammar or a repetition penalty (both change the distribution
        token by token), or no drafts."""
        spec = self.speculator
        if spec is None or self.native is None or seq.pending or seq.constraint is not None or seq.seen is not None:
            return False
        start = self.cache.lengths[0]
        context = seq.request.prompt + seq.row.ids
        room = min(spec.k, seq.max_new - seq.sampled, self.cache.capacity - start - 1)
        if room <= 0:
            return False
        greedy = seq.params.temperature < GREEDY_BELOW
        drafts, q = spec.drafter.propose(seq.id, context, room, seq.params, seq.generator)
        if not drafts:
            return False
        drafts = drafts[:room]
        m = len(drafts)
        adapters = None if seq.adapter is None else [self._adapter_index(seq)] * (m + 1)
        logits = self.native.step([context[-1], *drafts], list(range(start, start + m + 1)), cache_rows=[0] * (m + 1),
                                  adapters=adapters)
        argmax = logits.argmax(dim=-1).tolist()
        if greedy:
            kept = next((j for j, d in enumerate(drafts) if argmax[j] != d), m)
            residual = None
        else:
            kept, residual = verify(target_probs(logits[:m], seq.params), drafts, q, seq.generator)
        spec.stats.steps += 1
        spec.stats.proposed += m
        spec.stats.accepted += kept
        for j in range(kept):
            event = self._token_event(seq, drafts[j], logits[j:j + 1])
            self._emit(seq, event)
            if event.finish_reason is not None:
                self._retire()
                return True
        self.cache.lengths[0] = start + 1 + kept
        spec.drafter.kept(seq.id, len(context) + kept)
        seq.logits, seq.argmax = logits[kept:kept + 1], argmax[kept]
        seq.residual = None if residual is None else residual[None]
        return True

    def _retire(self) -> None:
        """Drop finished sequences and fill their slots with running ones from the end, so the
        running batch stays in slots 0..n-1 with one cache copy per refilled slot (shifting
        every later sequence down cost ~6% of a 16-client step)."""
        alive = [s.finish_reason is None for s in self._running]
        if all(alive):
            return
        n = sum(alive)
        holes = [i for i in range(n) if not alive[i]]
        movers = [i for i in range(n, len(self._running)) if alive[i]]
        for hole, src in zip(holes, movers):  # as many of one as of the other
            self.cache.move(src, hole)
            self._running[hole] = self._running[src]
        del self._running[n:]
