"""Token shards and the loader: exact round trip of the corpus, integrity checks, determinism."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data.corpora import synthetic_documents
from lmforge.data.loader import BatchLoader, TokenSplit, sequential_windows
from lmforge.data.prepare import adopt_prepared, prepare, read_index, split_document
from lmforge.data.tokenizer import TextTokenizer
from lmforge.errors import LmforgeError


def shard_texts(folder, split: str, tokenizer: TextTokenizer) -> list[str]:
    """The documents of one split, decoded from its memory-mapped shards and cut at end-of-text."""
    ids = np.concatenate([np.asarray(s) for s in TokenSplit(folder, split).shards]).tolist()
    docs, current = [], []
    for token in ids:
        if token == tokenizer.eos_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert current == []  # the last document is terminated too
    return docs


def test_shards_decode_back_to_the_corpus(tiny_data, tokenizer):
    originals = list(synthetic_documents())
    parts = [split_document(doc, 0.05, i) for i, doc in enumerate(originals)]
    train_docs, val_docs = shard_texts(tiny_data, "train", tokenizer), shard_texts(tiny_data, "val", tokenizer)
    assert train_docs == [t for t, _ in parts if t]
    assert val_docs == [v for _, v in parts if v]
    # Every document is its training head followed by its validation tail.
    assert [t + v for t, v in parts] == originals


def test_index_describes_the_shards(tiny_data):
    index = read_index(tiny_data)
    assert index["dtype"] == "uint16" and index["documents"] == 400
    for split in ("train", "val"):
        info = index["splits"][split]
        files = [tiny_data / f for f in info["files"]]
        assert sum(f.stat().st_size for f in files) == 2 * info["tokens"]
        assert TokenSplit(tiny_data, split).tokens == info["tokens"] > 0
    parts = [split_document(d, 0.05, i) for i, d in enumerate(synthetic_documents())]
    assert index["splits"]["train"]["bytes"] == sum(len(t.encode()) for t, _ in parts)
    assert index["splits"]["val"]["bytes"] == sum(len(v.encode()) for _, v in parts)
    assert index["splits"]["val"]["tokens"] > 0.02 * index["splits"]["train"]["tokens"]
    assert TextTokenizer.load(tiny_data).vocab_size == index["vocab_size"]


def test_split_document_cuts_at_line_boundaries():
    doc = "".join(f"line {i}\n" for i in range(20))
    train, val = split_document(doc, 0.1, 0)
    assert train + val == doc and val == "line 18\nline 19\n"
    short = "one line only"
    assert [split_document(short, 0.25, i) for i in range(4)] == [(short, "")] * 3 + [("", short)]


@pytest.fixture
def copied_data(tiny_data, tmp_path):
    return shutil.copytree(tiny_data, tmp_path / "copy")


@pytest.mark.parametrize("cut", [1, 2, 1000, "all"])
def test_truncated_shard_is_a_clear_error(copied_data, cut):
    shard = copied_data / "train-00000.bin"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(0 if cut == "all" else size - cut)
    with pytest.raises(LmforgeError, match="prepare"):
        TokenSplit(copied_data, "train")


def test_missing_shard_or_index_is_a_clear_error(copied_data):
    (copied_data / "val-00000.bin").unlink()
    with pytest.raises(LmforgeError, match="missing"):
        TokenSplit(copied_data, "val")
    (copied_data / "index.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="corrupt"):
        TokenSplit(copied_data, "train")
    (copied_data / "index.json").unlink()
    with pytest.raises(LmforgeError, match="lmforge data prepare"):
        TokenSplit(copied_data, "train")


def test_prepare_reuses_matching_data_and_refuses_other_settings(tiny_data):
    cfg = DataConfig(corpus="synthetic", tokenizer=TokenizerConfig(vocab_size=512))
    before = (tiny_data / "index.json").stat().st_mtime_ns
    assert prepare(cfg, tiny_data) == tiny_data
    assert (tiny_data / "index.json").stat().st_mtime_ns == before
    with pytest.raises(LmforgeError, match="other settings"):
        prepare(DataConfig(corpus="synthetic", tokenizer=TokenizerConfig(vocab_size=300)), tiny_data)


def test_prepare_with_an_existing_tokenizer_and_force(tiny_data, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"1. The king loves the sea.\n2. Line {i}.\n"}) + "\n"
                              for i in range(40)))
    cfg = DataConfig(corpus=str(corpus), tokenizer=TokenizerConfig(path=str(tiny_data)))
    out = prepare(cfg, tmp_path / "out")
    assert (out / "tokenizer.json").read_text() == (tiny_data / "tokenizer.json").read_text()
    assert read_index(out)["documents"] == 40
    (out / "stale-file").write_text("x")
    prepare(cfg, out, force=True)
    assert not (out / "stale-file").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "out"]


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("case", ["empty", "blank", "non-utf8", "missing", "tiny-vocab"])
def test_failed_prepare_leaves_nothing_behind(tmp_path, case):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    vocab = 512
    if case == "empty":
        (corpus / "a.txt").write_text("")
    elif case == "blank":
        (corpus / "a.txt").write_text("\n\n   \n")
    elif case == "non-utf8":
        (corpus / "a.txt").write_text("fine text\n" * 50)
        (corpus / "b.txt").write_bytes("caf\xe9\n".encode("latin-1") * 50)
    elif case == "missing":
        corpus = tmp_path / "nowhere"
    elif case == "tiny-vocab":
        (corpus / "a.txt").write_text("fine text\n" * 50)
        vocab = 100
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(LmforgeError):
        prepare(DataConfig(corpus=str(corpus), tokenizer=TokenizerConfig(vocab_size=vocab)), work / "out")
    assert leftovers(work) == []


def test_a_corpus_too_small_for_validation_is_refused(tmp_path):
    (tmp_path / "one.txt").write_text("one short line")  # one document, too short to split
    with pytest.raises(LmforgeError, match="too small"):
        prepare(DataConfig(corpus=str(tmp_path / "one.txt"), tokenizer=TokenizerConfig(vocab_size=300)),
                tmp_path / "out")
    assert leftovers(tmp_path) == ["one.txt"]


# ----------------------------------------------------------------------------- loader

def test_batch_i_is_the_same_in_every_loader_instance(tiny_data):
    a = BatchLoader(TokenSplit(tiny_data, "train"), batch_size=4, seq_len=32, seed=0)
    b = BatchLoader(TokenSplit(tiny_data, "train"), batch_size=4, seq_len=32, seed=0)
    for i in (0, 1, 7, 1000):
        xa, ya = a.batch(i)
        xb, yb = b.batch(i)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    other_seed = BatchLoader(TokenSplit(tiny_data, "train"), batch_size=4, seq_len=32, seed=1)
    assert not torch.equal(a.batch(0)[0], other_seed.batch(0)[0])


def test_loader_resumes_from_a_cursor(tiny_data):
    split = TokenSplit(tiny_data, "train")
    uninterrupted = [BatchLoader(split, 4, 32, seed=3).batch(i)[0] for i in range(6)]
    resumed = BatchLoader(split, 4, 32, seed=3)  # a fresh process picking up at cursor 3
    assert all(torch.equal(resumed.batch(i)[0], uninterrupted[i]) for i in range(3, 6))


def test_batches_are_shifted_windows_of_the_shard(tiny_data):
    split = TokenSplit(tiny_data, "train")
    x, y = BatchLoader(split, 8, 32, seed=0).batch(5)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    shard = torch.from_numpy(np.asarray(split.shards[0], dtype=np.int64))
    row = torch.cat([x[0], y[0, -1:]])
    starts = [s for s in range(len(shard) - 32) if torch.equal(shard[s:s + 33], row)]
    assert starts  # each row is a real window of the data


def test_loader_refuses_sequences_longer_than_the_data(tiny_data):
    with pytest.raises(LmforgeError, match="too few"):
        BatchLoader(TokenSplit(tiny_data, "val"), 2, seq_len=10**6, seed=0)


def test_sequential_windows_score_every_token_once(tiny_data):
    split = TokenSplit(tiny_data, "val")
    windows = list(sequential_windows(split, seq_len=64, batch_size=8))
    ys = torch.cat([y.flatten() for _, y in windows])
    assert len(ys) == (split.tokens - 1) // 64 * 64
    assert torch.equal(ys, torch.from_numpy(np.asarray(split.shards[0][1:len(ys) + 1], dtype=np.int64)))
    assert len(list(sequential_windows(split, 64, 8, max_batches=2))) == 2


def test_literal_special_token_text_in_a_document_is_plain_text(tiny_data, tmp_path):
    (tmp_path / "doc.txt").write_text("1. The king wrote <|endoftext|> and <|im_start|> in a letter.\n" * 8)
    out = prepare(DataConfig(corpus=str(tmp_path / "doc.txt"), tokenizer=TokenizerConfig(path=str(tiny_data))),
                  tmp_path / "out")
    tokenizer = TextTokenizer.load(out)
    ids = np.concatenate([np.asarray(s) for s in TokenSplit(out, "train").shards]).tolist()
    assert ids.count(tokenizer.eos_id) == 1  # only the separator after the document


def test_a_recipe_naming_only_a_prepared_directory_trains_on_it_as_prepared(tmp_path):
    """`lmforge data prepare my.txt --out data/mine --vocab-size 300` then `data: {dir: data/mine}`:
    the directory's own corpus and tokenizer settings, not the recipe defaults' (which refused it)."""
    text = tmp_path / "my.txt"
    text.write_text("".join(f"Line {i}: the tokenizer learns merges from this text.\n" for i in range(200)))
    made = DataConfig(corpus=str(text), tokenizer=TokenizerConfig(vocab_size=300))
    prepare(made, tmp_path / "mine")
    named = DataConfig(dir=str(tmp_path / "mine"))
    adopted = adopt_prepared(named)
    assert adopted.corpus == str(text) and adopted.tokenizer.vocab_size == 300
    assert prepare(adopted, adopted.dir) == tmp_path / "mine"  # reused, not refused
    with pytest.raises(LmforgeError, match="prepared with other settings"):  # a corpus named too must match
        prepare(adopt_prepared(DataConfig(corpus="shakespeare", dir=str(tmp_path / "mine"))), tmp_path / "mine")
