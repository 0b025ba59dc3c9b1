"""Tokens named readably: whole characters as text, a partial UTF-8 character as its bytes."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models

from lmforge.data.tokenizer import TextTokenizer, train_tokenizer
from lmforge.explain.tokens import readable_bytes, token_label

CHINESE = ["大语言模型的注意力机制（attention）决定了每个词元看到哪些词元。",
           "我们用中文技术文章训练分词器，模型学会常见的汉字组合。"] * 30


def test_a_partial_character_is_shown_as_its_bytes(tokenizer):
    """The session's tokenizer was trained on English only: each Chinese character is three byte tokens."""
    ids = tokenizer.encode("中文 attention")
    labels = [token_label(tokenizer, i) for i in ids]
    assert "\ufffd" not in "".join(labels)
    assert "".join(labels).startswith("\\xe4\\xb8\\xad\\xe6\\x96\\x87")  # 中 = e4 b8 ad, 文 = e6 96 87
    assert labels[-1] in ("n", "ion", "tion", "ention", " attention")  # whole-text tokens stay text


def test_whole_characters_stay_text_and_control_characters_are_escaped():
    tok = train_tokenizer(CHINESE, 400)
    ids = tok.encode("模型的注意力机制")  # as it stands in the training text: whole characters merged
    labels = [token_label(tok, i) for i in ids]
    assert len(ids) < 8 and "".join(labels) == "模型的注意力机制"
    assert [token_label(tok, i) for i in tok.encode("\n")] == ["\\n"]
    assert token_label(tok, tok.encode("\\")[0]) == "\\\\"  # a real backslash is not a byte escape


def test_sentencepiece_byte_fallback_tokens():
    vocab = {"<0xE4>": 0, "<0xB8>": 1, "<0xAD>": 2, "▁a": 3}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = TextTokenizer(backend, {})
    assert tok.decode([0, 1, 2]) == "中" and tok.decode([0]) == "\ufffd"
    assert [token_label(tok, i) for i in range(3)] == ["\\xe4", "\\xb8", "\\xad"]
    assert token_label(tok, 3) == " a"


def test_readable_bytes_mixes_text_and_broken_sequences():
    assert readable_bytes("模型".encode() + b"\xe4\xb8") == "模型\\xe4\\xb8"
    assert readable_bytes(b"\xad ok") == "\\xad ok"
    assert readable_bytes(b"") == ""
