"""Byte-level BPE tokenizers, trained and run by Hugging Face `tokenizers`.

Byte-level means every string has an encoding: any Unicode text (Chinese, emoji, code,
control characters) decodes back to exactly itself. Saved as `tokenizer.json` plus
`tokenizer_config.json`, so `transformers.AutoTokenizer` loads ours and we load theirs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.data.sentencepiece_convert import SPM_FILE, convert_sentencepiece
from lmforge.errors import LmforgeError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
RESERVED = [f"<|reserved_{i}|>" for i in range(4)]
SPECIAL_TOKENS = [EOS, PAD, *CHAT_TOKENS, *RESERVED]
MASK_TOKENS = ("<|mask|>", "<mask>", "[MASK]", RESERVED[0])  # the first that a tokenizer has is its mask token
BYTE_ALPHABET = 256

# ChatML: what our own models are fine-tuned on when a model directory brings no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def min_vocab_size() -> int:
    return BYTE_ALPHABET + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "TextTokenizer":
    if vocab_size < min_vocab_size():
        raise LmforgeError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                           f"{min_vocab_size()} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    config = {"eos_token": EOS, "pad_token": PAD, "bos_token": None, "unk_token": None,
              "chat_template": DEFAULT_CHAT_TEMPLATE}
    return TextTokenizer(tok, config)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class TextTokenizer:
    """Encode/decode text, know the special ids, render chat templates."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any]):
        self.backend = tokenizer
        self.config = dict(config)
        self.eos_id = self._id(self.config.get("eos_token"))
        self.pad_id = self._id(self.config.get("pad_token"))
        self.bos_id = self._id(self.config.get("bos_token"))
        if self.pad_id is None:
            self.pad_id = self.eos_id

    def _id(self, token: Any) -> int | None:
        text = _token_text(token)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], parse_special: bool = True) -> list[list[int]]:
        """`parse_special=False` encodes special-token text (a literal "<|endoftext|>" in a
        document) as plain bytes, so raw corpora cannot inject control tokens."""
        if parse_special:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        self.backend.encode_special_tokens = True
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.backend.encode_special_tokens = False

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def special_ids(self) -> dict[str, int | None]:
        return {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id}

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """`variables` are more names for the template (HF's convention: `tools`)."""
        from lmforge.data.chat_template import render_chat_template

        return render_chat_template(self.chat_template or DEFAULT_CHAT_TEMPLATE, messages,
                                    add_generation_prompt=add_generation_prompt, **variables,
                                    bos_token=_token_text(self.config.get("bos_token")) or "",
                                    eos_token=_token_text(self.config.get("eos_token")) or "")

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        d = Path(directory)
        self.backend.save(str(d / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "add_prefix_space": False, **self.config}
        if model_max_length:
            config["model_max_length"] = model_max_length
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> "TextTokenizer":
        """tokenizer.json (or, without one, a SentencePiece tokenizer.model, converted) + tokenizer_config.json."""
        d = Path(directory)
        path = d / "tokenizer.json" if d.is_dir() else d
        config = _read_config(path.parent / "tokenizer_config.json")
        keep = ("eos_token", "pad_token", "bos_token", "unk_token", "chat_template")
        config = {k: config.get(k) for k in keep if k in config}
        if path.is_file():
            return cls(_read_tokenizer_json(path), config)
        if d.is_dir() and (d / SPM_FILE).is_file():
            tok, specials = convert_sentencepiece(d)
            return cls(tok, {**{k: v for k, v in specials.items() if v is not None}, **config})
        raise LmforgeError(f"no tokenizer.json or {SPM_FILE} in {directory}: lmforge reads Hugging Face fast "
                           "tokenizers and SentencePiece models")


def _read_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions with long messages
        raise LmforgeError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not UTF-8 text") from None
    if not isinstance(config, dict):
        raise LmforgeError(f"{path} must hold a JSON object")
    return config


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def mask_token_id(tokenizer: TextTokenizer) -> int:
    """The token a masked-LM encoder is trained to fill in (and scored with): the tokenizer's own
    mask token, or the first reserved special token, which lmforge tokenizers carry for it."""
    for token in MASK_TOKENS:
        i = tokenizer.backend.token_to_id(token)
        if i is not None:
            return i
    raise LmforgeError(f"the tokenizer has no mask token (one of {', '.join(MASK_TOKENS)}); masked-LM training needs one")
