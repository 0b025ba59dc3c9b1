"""A SentencePiece `tokenizer.model` as a Hugging Face `tokenizers` Tokenizer.

Models trained with SentencePiece (Llama 1/2, Mistral, Gemma, T5, ...) sometimes ship only
tokenizer.model. lmforge runs every tokenizer through `tokenizers`, so such a model is
converted when its directory is read, by transformers' SentencePiece converter: the one
`AutoTokenizer` itself falls back on, maintained with SentencePiece's options (BPE and
Unigram, byte fallback, user-defined pieces, normalization rules, the dummy prefix).
Its generic path follows the model file's own settings rather than a tokenizer class's
conventions, so the ids are `sentencepiece.SentencePieceProcessor.encode`'s: those the
weights were trained on.

transformers is an optional dependency of lmforge (`pip install 'lmforge[sentencepiece]'`):
only directories without a tokenizer.json need it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from tokenizers import Tokenizer

from lmforge.errors import LmforgeError

SPM_FILE = "tokenizer.model"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
INSTALL = "pip install 'lmforge[sentencepiece]'"


@contextmanager
def _quiet(logging):
    """transformers warns about options of its own tokenizer classes that do not apply here."""
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def convert_sentencepiece(folder: Path) -> tuple[Tokenizer, dict[str, str | None]]:
    """The tokenizer of `folder/tokenizer.model` (with its tokenizer_config.json, if any) and
    its special tokens' text: {bos_token, eos_token, unk_token, pad_token}."""
    path = folder / SPM_FILE
    try:
        import sentencepiece  # noqa: F401  (transformers reads the model file with its protobuf schema)
        from transformers import TokenizersBackend
        from transformers.utils import logging
    except ImportError:
        raise LmforgeError(f"{path} is a SentencePiece model and {folder} has no tokenizer.json: converting it needs "
                           f"transformers and sentencepiece ({INSTALL})") from None
    with _quiet(logging):
        try:
            # legacy=True whatever the directory says: each run of text between special tokens gets
            # SentencePiece's dummy prefix, as the model saw it when each run was encoded on its own
            converted = TokenizersBackend.from_pretrained(str(folder), local_files_only=True, legacy=True)
        except Exception as e:  # protobuf, sentencepiece and transformers each raise their own types
            message = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise LmforgeError(f"{path} could not be read as a SentencePiece model ({message})") from None
    backend = converted.backend_tokenizer
    if backend is None or backend.get_vocab_size() == 0:
        raise LmforgeError(f"{path} could not be converted: it holds no vocabulary")
    specials = {key: getattr(converted, key, None) for key in SPECIAL_KEYS}
    return backend, {key: str(value) if value is not None else None for key, value in specials.items()}
