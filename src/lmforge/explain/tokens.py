"""Tokens named readably on screen, one at a time.

A byte-level tokenizer splits a Chinese character (three UTF-8 bytes) across tokens, and such
a token alone decodes to U+FFFD. Its name here is its bytes instead (`\\xe4\\xb8`), read from
the vocabulary: byte-level BPE stores bytes as printable stand-ins (GPT-2's byte-to-character
table), SentencePiece's byte fallback as `<0xE4>`. Control characters and newlines are shown
escaped (`\\n`), as Python's repr shows them; a literal backslash as `\\\\`.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lmforge.data.tokenizer import TextTokenizer

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's stand-in character -> byte: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_bytes(tokenizer: TextTokenizer, token_id: int) -> bytes | None:
    """The bytes a token stands for, when its vocabulary entry spells them out."""
    piece = tokenizer.backend.id_to_token(token_id)
    if piece is None:
        return None
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    table = _byte_level_decoder()
    if all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return None


def _escaped(text: str) -> str:
    return repr(text)[1:-1]


def readable_bytes(data: bytes) -> str:
    """UTF-8 text as itself (escaped like repr), the bytes of any broken sequence as `\\xNN`."""
    out = []
    while data:
        try:
            out.append(_escaped(data.decode("utf-8")))
            break
        except UnicodeDecodeError as e:
            out.append(_escaped(data[:e.start].decode("utf-8")))
            out.append("".join(f"\\x{b:02x}" for b in data[e.start:e.end]))
            data = data[e.end:]
    return "".join(out)


def token_label(tokenizer: TextTokenizer, token_id: int) -> str:
    """How one token is shown: its text, or its bytes where its text is a partial character."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        data = token_bytes(tokenizer, token_id)
        if data is not None and "\ufffd" not in data.decode("utf-8", errors="ignore"):
            return readable_bytes(data) or "∅"
    return _escaped(text) or "∅"
