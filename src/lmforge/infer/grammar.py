"""Constrained decoding: a grammar (llguidance) decides which tokens may come next.

A request may carry a grammar (llguidance's JSON form: made from a JSON schema, a regex or a
Lark grammar). Its sequence then gets a matcher, which follows the tokens sampled so far; at
each step the tokens the grammar does not allow next get -inf logits before sampling, and the
end-of-text token (or the chat's end of turn) is allowed only where the grammar accepts the
output as complete.

llguidance was chosen over xgrammar and outlines-core (benchmarks/RESULTS.md): it covers JSON
schema, regex and context-free grammars, compiles a schema in about a millisecond without a
per-vocabulary index, and installs as one small wheel without dependencies.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import llguidance
import torch
from llguidance.torch import allocate_token_bitmask

from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError


class GrammarError(LmforgeError):
    """A grammar (schema, regex, Lark) that cannot be used to constrain decoding."""


_tokenizers: weakref.WeakKeyDictionary[TextTokenizer, dict[tuple, llguidance.LLTokenizer]] = \
    weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def grammar_tokenizer(tokenizer: TextTokenizer, vocab: int, end_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer, whose end tokens are `end_ids` (built once: it takes
    a fraction of a second on a large vocabulary)."""
    key = (vocab, end_ids)
    with _tokenizers_lock:
        per = _tokenizers.setdefault(tokenizer, {})
        if key not in per:
            per[key] = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab, eos_token=list(end_ids))
        return per[key]


def check_grammar(grammar: str, tokenizer: llguidance.LLTokenizer | None = None) -> None:
    """Raise GrammarError with llguidance's reason when the grammar cannot be used."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise GrammarError(messages[0] if messages else "invalid grammar")


# Compiled grammars, fresh, by (grammar, tokenizer): an application sends the same schema
# again and again, and copying a matcher is cheaper than compiling its grammar.
COMPILED_MAX = 64
_compiled: OrderedDict[tuple[str, int], tuple[llguidance.LLTokenizer, llguidance.LLMatcher]] = OrderedDict()
_compiled_lock = threading.Lock()


def _fresh_matcher(grammar: str, tokenizer: llguidance.LLTokenizer) -> llguidance.LLMatcher:
    key = (grammar, id(tokenizer))
    with _compiled_lock:
        hit = _compiled.get(key)
        if hit is not None and hit[0] is tokenizer:
            _compiled.move_to_end(key)
            return hit[1].deep_copy()
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    with _compiled_lock:
        _compiled[key] = (tokenizer, matcher.deep_copy())
        while len(_compiled) > COMPILED_MAX:
            _compiled.popitem(last=False)
    return matcher


class Constraint:
    """One sequence's matcher: which tokens may come next given the ones sampled so far."""

    def __init__(self, grammar: str, tokenizer: llguidance.LLTokenizer):
        self.matcher = _fresh_matcher(grammar, tokenizer)
        self.end_ids = set(tokenizer.eos_tokens)
        self.masked = False  # the current logits already had this step's mask applied

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        self.masked = False

    @property
    def done(self) -> bool:
        """The grammar allows nothing but the end."""
        return self.matcher.is_stopped()


class Masks:
    """The next-token masks of constrained sequences, computed in the engine's thread.

    Each matcher writes its mask straight into one row of a reused bitmask (llguidance
    releases the GIL meanwhile). Handing the work to a thread that runs during the forward
    pass measured slower on a 2-core machine: the forward already uses every core, and the
    hand-offs between threads cost more than the masks (benchmarks/RESULTS.md)."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.bitmask = allocate_token_bitmask(1, vocab)

    def allowed(self, constraints: list[Constraint]) -> torch.Tensor:
        """(len(constraints), V) bool: True where the token may come next."""
        n = len(constraints)
        if self.bitmask.shape[0] < n:
            self.bitmask = allocate_token_bitmask(n, self.vocab)
        row_bytes = self.bitmask.stride(0) * self.bitmask.element_size()
        base = self.bitmask.data_ptr()
        for i, c in enumerate(constraints):
            c.matcher.unsafe_compute_mask_ptr(base + i * row_bytes, row_bytes)
        return unpack(self.bitmask[:n], self.vocab)


_BITS = torch.arange(32, dtype=torch.int32)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, ceil(V/32)) int32 bitmask -> (B, V) bool."""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> None:
    """logits (1, V) in place: -inf where not allowed."""
    logits.masked_fill_(~allowed.to(logits.device).unsqueeze(0), float("-inf"))
