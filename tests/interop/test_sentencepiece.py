"""A Hugging Face directory whose tokenizer is only a SentencePiece tokenizer.model imports,
with the ids SentencePiece itself gives (and transformers' SentencePiece tokenizer), on
English, Chinese technical text with English terms, emoji and code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from tiny_models import FAMILIES, hf_logits, transformers

import lmforge
from lmforge.errors import LmforgeError
from lmforge.interop.convert import import_model

TEXT = """\
The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces; models see only ids.
在深度学习中，Transformer 模型使用 self-attention 机制处理序列；我们用 PyTorch 2.4 和 CUDA 12.1 训练。
大语言模型（LLM）的 tokenizer 通常基于 BPE 或 Unigram 算法，词表大小为 32000，并支持 byte fallback。
请把 config.json 里的 max_position_embeddings 设为 4096，然后运行 `pip install -e .` 安装依赖。
Emoji: 🚀🔥 launch ready 👍🏽 and the family 👨‍👩‍👧 arrived ✅ — très bien, naïve café.
def add(a: int, b: int) -> int:
    return a + b  # sum of two numbers

for i in range(10):
\tprint(f"{i:03d}", end="\\t")
  Leading,   repeated   and trailing spaces.  
"""
# Lines the model never saw in training: rare characters reach the byte fallback.
UNSEEN = ["量子计算 quantum computing 需要 error correction 🧪", "SELECT id, url FROM pages WHERE lang = 'zh';",
          "   indented\tand\ttabbed   ", "🦙🦙 llama ⚡️"]
LLAMA_STYLE = dict(byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                   split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995)
STYLES = {
    # Llama 1/2, Mistral: BPE, byte fallback, <unk> <s> </s> first, a dummy prefix before the text.
    "llama-bpe": ("bpe", LLAMA_STYLE, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                       "tokenizer_class": "LlamaTokenizer", "legacy": False}),
    # A Unigram model with byte fallback.
    "unigram": ("unigram", LLAMA_STYLE, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    # Gemma: BPE, no dummy prefix, <pad> <eos> <bos> <unk> first, turn markers as user-defined pieces.
    "gemma-bpe": ("bpe", {**LLAMA_STYLE, "add_dummy_prefix": False, "pad_id": 0, "eos_id": 1, "bos_id": 2,
                          "unk_id": 3, "pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>",
                          "user_defined_symbols": ["<start_of_turn>", "<end_of_turn>"]},
                  {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "tokenizer_class": "GemmaTokenizer"}),
}
SPM_VOCAB = 420
EMBEDDING_ROWS = 448  # padded past the tokenizer's size, as many checkpoints are


def lines() -> list[str]:
    return [*TEXT.splitlines(), TEXT, *UNSEEN]


def train_spm(folder, style: str):
    model_type, options, tokenizer_config = STYLES[style]
    corpus = folder.parent / f"{style}-corpus.txt"
    corpus.write_text(TEXT * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), model_type=model_type,
                                   vocab_size=SPM_VOCAB, num_threads=1, minloglevel=2, **options)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory):
    """{style: (transformers model, its directory with tokenizer.model only, the SentencePiece processor)}."""
    torch.manual_seed(0)
    config = FAMILIES["llama"]()
    config.vocab_size = EMBEDDING_ROWS
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    out = {}
    for style in STYLES:
        folder = tmp_path_factory.mktemp(f"spm-{style}")
        model.save_pretrained(folder)
        out[style] = (model, folder, train_spm(folder, style))
        assert not (folder / "tokenizer.json").exists()
    return out


@pytest.mark.parametrize("style", list(STYLES))
def test_import_converts_tokenizer_model_with_sentencepiece_ids(style, spm_dirs, tmp_path):
    hf_model, folder, sp = spm_dirs[style]
    imported = import_model(folder, tmp_path / "imported")
    assert (imported / "tokenizer.json").is_file()
    ours = lmforge.load(imported)
    # transformers' tokenizer over sentencepiece itself; legacy=True is its plain form (legacy=False leaves the
    # dummy prefix to a model class's own `tokenize`, which this generic class does not have)
    slow = transformers.SentencePieceBackend.from_pretrained(str(folder), legacy=True)
    fast = transformers.AutoTokenizer.from_pretrained(str(imported))  # the ecosystem reads what we wrote
    byte_pieces = 0
    for line in lines():
        expected = sp.encode(line)
        assert ours.tokenizer.encode(line) == expected, line
        assert slow.encode(line, add_special_tokens=False) == expected, line
        assert fast.encode(line, add_special_tokens=False) == expected, line
        assert ours.tokenizer.decode(expected) == sp.decode(expected) == line
        byte_pieces += sum(sp.is_byte(i) for i in expected)
    assert byte_pieces > 0  # the unseen lines went through the byte fallback
    assert ours.tokenizer.vocab_size == sp.get_piece_size()
    assert (ours.tokenizer.bos_id, ours.tokenizer.eos_id) == (sp.bos_id(), sp.eos_id())
    hf_config = json.loads((imported / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    ids = torch.tensor([sp.encode(TEXT)[:48]])
    with torch.no_grad():
        assert (ours.model(ids).float() - hf_logits(hf_model, ids)).abs().max() < 1e-4


def test_user_defined_pieces_stay_whole(spm_dirs):
    _, folder, sp = spm_dirs["gemma-bpe"]
    tokenizer = lmforge.load(folder).tokenizer
    turn = "<start_of_turn>user\n写一个 Python 函数 🐍<end_of_turn>\n"
    ids = tokenizer.encode(turn)
    assert ids == sp.encode(turn)
    assert ids[0] == sp.piece_to_id("<start_of_turn>") and sp.piece_to_id("<end_of_turn>") in ids


def test_text_after_a_special_token_is_encoded_as_sentencepiece_encodes_it_alone(spm_dirs):
    _, folder, sp = spm_dirs["llama-bpe"]  # its tokenizer_config.json says legacy: false, as Llama 2's does
    tokenizer = lmforge.load(folder).tokenizer
    prompt, answer = "[INST] 用 Python 读取 JSONL 文件 [/INST]", " 使用 json.loads 逐行解析 🙂"
    assert tokenizer.encode(f"<s>{prompt}{answer}</s>") == [sp.bos_id(), *sp.encode(prompt + answer), sp.eos_id()]
    assert tokenizer.encode(f"{prompt}</s><s>{prompt}") == [*sp.encode(prompt), sp.eos_id(), sp.bos_id(),
                                                            *sp.encode(prompt)]


def test_corrupt_tokenizer_model_is_one_clear_error(spm_dirs, tmp_path):
    import shutil

    folder = shutil.copytree(spm_dirs["llama-bpe"][1], tmp_path / "m")
    (folder / "tokenizer.model").write_bytes(b"\x0a\xff\xff not a sentencepiece model")
    with pytest.raises(LmforgeError, match=r"tokenizer\.model could not be read as a SentencePiece model"):
        import_model(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    bad = subprocess.run([sys.executable, "-m", "lmforge", "import", str(folder), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "could not be read as a SentencePiece model" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_without_transformers_the_error_says_what_to_install(spm_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(LmforgeError, match=r"needs transformers and sentencepiece \(pip install 'lmforge\[sentencepiece\]'\)"):
        import_model(spm_dirs["unigram"][1], tmp_path / "out")
    assert not (tmp_path / "out").exists()
