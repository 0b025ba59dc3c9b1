"""KV-cache generation for a batch of prompts, with streaming and stop strings.

Prompts of different lengths are left-padded so that every row's next token sits in the
same column; the cache marks the padding so it is never attended to. Each step feeds one
token per row and computes logits for the last position only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.infer.chunked_prefill import DEFAULT_PREFILL_CHUNK, prefill
from lmforge.infer.native_decode import NativeDecoder, step_cache
from lmforge.infer.sampling import SamplingParams, apply_repetition_penalty, sample
from lmforge.model import Transformer
from lmforge.model.kv_int8 import new_cache

# on_text(row, new_text): called as each row's text grows (streaming).
TextCallback = Callable[[int, str], None]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-text or another stop token, or a stop string) or "length"


class RowText:
    """Decodes one row incrementally; holds back text that ends in a partial UTF-8 sequence.

    Each token decodes only a short window, the ids from `_prefix` on, and keeps what that
    adds beyond the text of ids[_prefix:_read] (already emitted). So a token costs the same
    at the 1000th step as at the first, and decoders that treat a sequence's first token
    specially (SentencePiece's leading space) see the same first token in both decodes."""

    def __init__(self, tokenizer: TextTokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, cut at a stop string
        self.emitted = 0
        self.stopped = False
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the tail of `text` (context)
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def _append(self, new: str) -> None:
        before = len(self.text)
        self.text += new
        # A stop string can only end inside the new text: search from where it could begin.
        for s in self.stop:
            at = self.text.find(s, max(0, before - len(s) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.stopped:
            return ""
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(self._prefix_text) and not window.endswith("\ufffd"):
            self._append(window[len(self._prefix_text):])
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        # Hold back a possible stop string's prefix.
        safe = len(self.text)
        if not self.stopped:
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        new, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return new

    def flush(self) -> str:
        """The rest, including an incomplete character at the end (as a replacement character)."""
        if not self.stopped and self._read < len(self.ids):
            window = self._decode(self.ids[self._prefix:])
            self._append(window[len(self._prefix_text):])
            self._prefix = self._read = len(self.ids)
            self._prefix_text = ""
        new, self.emitted = self.text[self.emitted:], len(self.text)
        return new


def encode_prompts(tokenizer: TextTokenizer, prompts: list[str] | list[list[int]]) -> list[list[int]]:
    encoded = [list(p) if isinstance(p, (list, tuple)) else tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            # An empty prompt starts from the end-of-text token, as a document boundary.
            if tokenizer.eos_id is None:
                raise LmforgeError(f"prompt {i} is empty and the tokenizer has no end-of-text token to start from")
            encoded[i] = [tokenizer.eos_id]
    return encoded


_noticed: set[str] = set()


def native_notice(message: str) -> None:
    """Say once per process (on stderr) why decoding left the native path."""
    if message not in _noticed:
        _noticed.add(message)
        print(f"note: {message}", file=sys.stderr)


# on_token(row, token) -> True to finish that row (a stop string was seen).
TokenCallback = Callable[[int, int], bool]


@torch.inference_mode()
def generate_ids(model: Transformer, prompts: list[list[int]], params: SamplingParams, eos_id: int | None,
                 pad_id: int = 0, on_token: TokenCallback | None = None, native: bool = True,
                 stop_token_ids: Collection[int] = (),
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 kv_cache_dtype: str = "auto") -> tuple[list[list[int]], list[str]]:
    """The decoding loop on token ids: (new ids per row, finish reason per row).

    A row finishes on `eos_id` or one of `stop_token_ids` (a chat turn's end; neither is
    included in its ids), when `on_token` says so, or at `max_new_tokens` / the context limit
    ("length"). After the prefill, steps run through the native decoder where the model allows
    it (`native=False` forces the PyTorch model). The prompts are prefilled `prefill_chunk`
    tokens at a time (None: in one forward), which bounds a long prompt's memory.
    `kv_cache_dtype="int8"` stores keys and values as int8 (model/kv_int8.py); the native
    decoder reads float caches only, so such a cache decodes through the PyTorch model."""
    ends = {eos_id, *stop_token_ids} - {None}
    context = model.config.context
    longest = max(len(ids) for ids in prompts)
    if longest >= context:
        raise LmforgeError(f"a prompt has {longest} tokens; the model's context is {context}: shorten it")
    max_new = min(params.max_new_tokens, context - longest)
    B = len(prompts)
    out: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    if max_new == 0:
        return out, finish
    device = model.tok_emb.weight.device
    ids = torch.full((B, longest), pad_id, dtype=torch.long)
    pad_mask = torch.zeros(B, longest, dtype=torch.bool)
    for r, row in enumerate(prompts):
        ids[r, longest - len(row):] = torch.tensor(row)
        pad_mask[r, longest - len(row):] = True
    ids, pad_mask = ids.to(device), pad_mask.to(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, pad_mask)

    done = [False] * B
    cache = new_cache(model, B, longest + max_new, kv_cache_dtype)
    logits = prefill(model, ids, cache, None if bool(pad_mask.all()) else pad_mask, prefill_chunk)[:, -1]
    if native and kv_cache_dtype != "auto":
        native_notice(f"an {kv_cache_dtype} KV cache decodes through the PyTorch model (the native decoder reads fp32 caches)")
        native = False
    decoder = NativeDecoder.for_cache(model, cache) if native else None
    for step in range(max_new):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        nxt = sample(logits, params, generator)
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        for r, token in enumerate(nxt.tolist()):
            if done[r]:
                continue
            if token in ends:
                done[r], finish[r] = True, "stop"
                continue
            out[r].append(token)
            if on_token is not None and on_token(r, token):
                done[r], finish[r] = True, "stop"
        if all(done) or step == max_new - 1:
            break
        if decoder is not None:
            logits = step_cache(decoder, cache, nxt.tolist())
        else:
            logits = model(nxt[:, None], cache, last_only=True)[:, -1]
    return out, finish


def generate(model: Transformer, tokenizer: TextTokenizer, prompts: list[str] | list[list[int]],
             params: SamplingParams | None = None, on_text: TextCallback | None = None,
             native: bool = True, stop_token_ids: Collection[int] = (),
             prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, kv_cache_dtype: str = "auto") -> list[Completion]:
    """Text continuations of each prompt, streamed through `on_text` as they grow; a row also
    ends on any of `stop_token_ids` (e.g. `end_of_turn_ids(tokenizer)` for a chat reply)."""
    params = params or SamplingParams()
    if not prompts:
        return []
    encoded = encode_prompts(tokenizer, prompts)
    rows = [RowText(tokenizer, params.stop) for _ in encoded]

    def on_token(r: int, token: int) -> bool:
        new = rows[r].add(token)
        if new and on_text:
            on_text(r, new)
        return rows[r].stopped

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids, finish = generate_ids(model, encoded, params, tokenizer.eos_id, pad, on_token, native, stop_token_ids,
                               prefill_chunk, kv_cache_dtype)
    results = []
    for r, row in enumerate(rows):
        tail = row.flush()
        if tail and on_text:
            on_text(r, tail)
        results.append(Completion(row.text, ids[r], finish[r]))
    return results
