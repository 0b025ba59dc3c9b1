from __future__ import annotations

import pytest
from tiny_models import CHAT_TEMPLATE, FAMILIES, TEXT, VOCAB, make_hf_model, save_hf_dir

from lmforge.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    tok = train_tokenizer(TEXT, VOCAB)
    tok.config["chat_template"] = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, tokenizer):
    """{family: (transformers model, its saved directory)}; llama saved sharded."""
    out = {}
    for family in FAMILIES:
        model = make_hf_model(family)
        folder = tmp_path_factory.mktemp(f"hf-{family}")
        out[family] = (model, save_hf_dir(model, tokenizer, folder, shard="20KB" if family == "llama" else None))
    return out
