"""Token logprobs in the two shapes of the OpenAI API: the completions API's parallel lists
(tokens, token_logprobs, top_logprobs, text_offset) and the chat API's list of entries with
their bytes. `token_text` turns a token id into the text it shows as (the tokenizer's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.infer.engine import TokenLogprob

TokenText = Callable[[int], str]

JSON_MIN = -1e30  # JSON has no -inf: an impossible token gets this


def finite(x: float) -> float:
    return x if x > JSON_MIN else JSON_MIN


def completion_logprobs(entries: list[tuple[TokenLogprob | None, int]], offset: int,
                        token_text: TokenText) -> dict[str, list]:
    """The completions API's logprobs of these (logprob or None, token id) pairs, whose text
    starts at character `offset` of the choice's text. A prompt's first token has no logprob."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for e, tok in entries:
        s = token_text(tok)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if e is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        top = {token_text(t): finite(lp) for t, lp in e.top}
        top.setdefault(s, finite(e.logprob))  # the chosen token always has its logprob
        token_logprobs.append(finite(e.logprob))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_logprobs(tokens: list[TokenLogprob], token_text: TokenText) -> dict[str, list]:
    """The chat API's logprobs: each sampled token with its text, logprob and UTF-8 bytes, and
    its best alternatives in the same shape."""
    def entry(t: int, lp: float) -> dict[str, Any]:
        s = token_text(t)
        return {"token": s, "logprob": finite(lp), "bytes": list(s.encode("utf-8"))}
    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in t.top]}
                        for t in tokens]}
