"""Byte-level BPE: every string round-trips; saved tokenizers load in transformers unchanged."""

from __future__ import annotations

import pytest

from lmforge.data.tokenizer import EOS, PAD, SPECIAL_TOKENS, TextTokenizer, min_vocab_size, train_tokenizer
from lmforge.errors import LmforgeError

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:15pm, isn't it?",
    "chinese": "今天天气很好，我们去公园散步吧。",
    "emoji": "launch 🚀🚀 done ✅ family 👨‍👩‍👧 flags 🇫🇷",
    "code": 'def f(x):\n\treturn {"a": [x ** 2, x // 3]}  # comment\n\n\nif __name__ == "__main__":\n    f(1)\r\n',
    "control": "nul\x00 bell\x07 esc\x1b[31m del\x7f \x0b\x0c ends\u2028",
    "special_token_text": f"a literal {EOS} and {PAD} and <|im_start|>user\nhi<|im_end|> in the text",
    "whitespace": "   leading and trailing   \n\n\t ",
    "empty": "",
}


@pytest.mark.parametrize("name", SAMPLES)
def test_any_text_round_trips(tokenizer, name):
    text = SAMPLES[name]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert (ids == []) == (text == "")


def test_batch_encoding_equals_one_by_one(tokenizer):
    texts = list(SAMPLES.values())
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_special_tokens_have_fixed_ids_and_can_be_skipped(tokenizer):
    assert [tokenizer.backend.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.eos_id == 0 and tokenizer.pad_id == 1 and tokenizer.bos_id is None
    ids = tokenizer.encode("hi") + [tokenizer.eos_id]
    assert tokenizer.decode(ids, skip_special=True) == "hi"
    assert tokenizer.decode(ids) == "hi" + EOS


def test_vocab_smaller_than_bytes_plus_specials_is_a_clear_error():
    assert min_vocab_size() == 256 + len(SPECIAL_TOKENS)
    with pytest.raises(LmforgeError, match=f"at least {min_vocab_size()}"):
        train_tokenizer(["some text"], vocab_size=min_vocab_size() - 1)
    tok = train_tokenizer(["some text"], vocab_size=min_vocab_size())  # the smallest allowed works
    assert tok.decode(tok.encode("ünïcödé 字")) == "ünïcödé 字"


def test_training_is_deterministic():
    texts = ["the cat sat on the mat"] * 20 + ["a dog ran in the park"] * 20
    a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert a.backend.to_str() == b.backend.to_str()
    assert len(a.encode("the cat sat")) < len("the cat sat")  # merges were learned


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path, model_max_length=64)
    again = TextTokenizer.load(tmp_path)
    for text in SAMPLES.values():
        assert again.encode(text) == tokenizer.encode(text)
    assert again.special_ids() == tokenizer.special_ids()
    assert again.chat_template == tokenizer.chat_template


def test_loading_a_missing_or_corrupt_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="no tokenizer.json"):
        TextTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"')
    with pytest.raises(LmforgeError, match="not a valid tokenizer.json"):
        TextTokenizer.load(tmp_path)


def test_transformers_autotokenizer_loads_it_and_encodes_identically(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path, model_max_length=64)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for name, text in SAMPLES.items():
        assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text), name
        assert theirs.decode(tokenizer.encode(text)) == text, name
    assert theirs.eos_token == EOS and theirs.eos_token_id == tokenizer.eos_id
    assert theirs.pad_token_id == tokenizer.pad_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_default_chat_template_is_chatml(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(LmforgeError, match="role"):
        tokenizer.apply_chat_template([{"content": "no role"}])
