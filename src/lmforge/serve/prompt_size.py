"""How many bytes of text one token can stand for: what lets the server refuse an over-long
prompt by its size, before spending the time to tokenize it.

If no token covers more than L bytes of its input, a text of B bytes makes at least B / L
tokens, so B > limit x L means more than `limit` tokens for sure. That holds only for a
tokenizer that drops nothing and shrinks nothing beyond a known factor, which is read off its
`tokenizer.json`:

- the model is BPE with no unknown token that swallows a run of characters (`fuse_unk`);
  WordPiece and WordLevel map a whole word to one unknown token, however long it is;
- the pre-tokenizer only splits (byte-level, digits, punctuation, Metaspace, a Split that
  keeps its matches), never removes: whitespace splitting drops the whitespace;
- the normalizer is absent or one whose shrinking is bounded: NFC/NFD (a Hangul syllable's
  3 bytes from its 3 jamo's 9: 3x), NFKC/NFKD (4x: a 4-byte mathematical letter to 1 byte),
  lowercasing (3x: the Kelvin sign to "k"), prepending;
- no added token strips the whitespace beside it, and nothing truncates.

For any other tokenizer there is no bound (None) and every prompt is tokenized.
"""

from __future__ import annotations

import json
from typing import Any

from lmforge.data.tokenizer import TextTokenizer

NORMALIZER_SHRINK = {"NFC": 3, "NFD": 3, "NFKC": 4, "NFKD": 4, "Lowercase": 3, "Prepend": 1}
SPLITTING_PRE_TOKENIZERS = {"ByteLevel", "Digits", "Punctuation", "Metaspace", "UnicodeScripts", "Split"}


def _shrink(normalizer: dict[str, Any] | None) -> int | None:
    if normalizer is None:
        return 1
    if normalizer.get("type") == "Sequence":
        factor = 1
        for n in normalizer.get("normalizers", []):
            f = _shrink(n)
            if f is None:
                return None
            factor *= f
        return factor
    return NORMALIZER_SHRINK.get(normalizer.get("type"))


def _pre_tokenizers(pre: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The pre-tokenizers in order, or None if one of them removes text."""
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        out: list[dict[str, Any]] = []
        for p in pre.get("pretokenizers", []):
            inner = _pre_tokenizers(p)
            if inner is None:
                return None
            out += inner
        return out
    if pre.get("type") not in SPLITTING_PRE_TOKENIZERS or str(pre.get("behavior", "")).lower() == "removed":
        return None
    return [pre]


def max_bytes_per_token(tokenizer: TextTokenizer) -> int | None:
    """The most input bytes one token can stand for (normalization included), or None when
    the tokenizer gives no such bound."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("unk_token") is not None and model.get("fuse_unk")):
        return None
    if spec.get("truncation") is not None:
        return None
    shrink = _shrink(spec.get("normalizer"))
    pre = _pre_tokenizers(spec.get("pre_tokenizer"))
    if shrink is None or pre is None:
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    # Byte-level vocabularies spell each input byte as one character; others are real text
    # (a Metaspace "▁" stands for one space in three bytes: an overestimate, still a bound).
    byte_level = any(p.get("type") == "ByteLevel" for p in pre)
    vocab = model.get("vocab") or {}
    longest = max((len(t) if byte_level else len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1)
    longest = max([longest, 4 if model.get("unk_token") is not None else 1,  # an unknown character
                   *(len(t.get("content", "").encode("utf-8", "surrogatepass")) for t in added)])
    return longest * shrink
