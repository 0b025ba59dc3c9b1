"""`lmforge classify` and `lmforge tag` on heads trained here: English sentiment, and named
entities in English words and Chinese characters, from --text, plain files, JSONL and stdin."""

from __future__ import annotations

import io
import json
import random
import sys

import pytest
from helpers import TEXT, save_random_model, write_jsonl
from test_heads import head_config, ner_rows, sentiment_rows

from lmforge.cli import main
from lmforge.data.tokenizer import train_tokenizer
from lmforge.train.finetune import finetune
from lmforge.data.words import split_words

SENTENCE = "我们在今天的会议上讨论了模型训练和数据清洗的问题"
NAMES, PLACES = ["张伟", "李娜", "王芳"], ["北京", "上海", "深圳"]
# News-style clauses, joined into sentences with their punctuation as Chinese NER corpora hold
# them; {P} a person, {L} a place.
CLAUSES = ["{P}去了{L}", "{P}在{L}讨论模型训练", "今天{P}和{P}开会", "{L}的数据清洗很重要", "我们见到了{P}",
           "{P}说问题很重要", "在{L}的会议上", "{P}讨论了数据"]


def chinese_ner_rows(n: int, seed: int):
    """Character-level BIO rows, as Chinese NER corpora label them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chars, tags = [], []
        sentence = "，".join(rng.sample(CLAUSES, rng.randint(1, 3))) + "。"
        for piece in sentence.replace("{", "|{").replace("}", "}|").split("|"):
            if piece in ("{P}", "{L}"):
                kind, names = ("PER", NAMES) if piece == "{P}" else ("LOC", PLACES)
                chars += list(rng.choice(names))
                tags += [f"B-{kind}", f"I-{kind}"]
            else:
                chars += list(piece)
                tags += ["O"] * len(piece)
        rows.append({"tokens": chars, "tags": tags})
    return rows


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """(classify model dir, tag model dir) fine-tuned on one random bilingual base (~25 s)."""
    root = tmp_path_factory.mktemp("heads")
    tok = train_tokenizer(TEXT + [SENTENCE + "，。" + "".join(NAMES + PLACES)] * 20, 400)
    base = save_random_model(root / "base", "llama", tokenizer=tok, vocab_size=tok.vocab_size, init_std=0.2)
    train = write_jsonl(root / "c_train.jsonl", sentiment_rows(400, 0))
    val = write_jsonl(root / "c_val.jsonl", sentiment_rows(100, 1))
    classify = finetune(head_config(root, base, "classify", train, val), progress=False, log=lambda s: None)
    rows = ner_rows(300, 0) + chinese_ner_rows(300, 0)
    random.Random(0).shuffle(rows)
    train = write_jsonl(root / "t_train.jsonl", rows)
    val = write_jsonl(root / "t_val.jsonl", ner_rows(50, 1) + chinese_ner_rows(50, 1))
    tag = finetune(head_config(root, base, "tag", train, val, {"train": {"max_steps": 90}}), progress=False,
                   log=lambda s: None)
    assert classify.metrics["accuracy"] > 0.9 and tag.metrics["entity_f1"] > 0.9
    return classify.output, tag.output


@pytest.fixture
def run(monkeypatch, capsys):
    """run(*args, stdin="") -> (exit code, stdout, stderr) of `lmforge ...`, in this process."""

    def call(*args, stdin: str = ""):
        monkeypatch.setattr(sys, "argv", ["lmforge", *map(str, args)])
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        with pytest.raises(SystemExit) as info:
            main()
        out = capsys.readouterr()
        return info.value.code or 0, out.out, out.err

    return call


def test_split_words_as_tagging_corpora_do():
    assert [w for w, _, _ in split_words("Alice flew to New York, in 2024.")] == \
        ["Alice", "flew", "to", "New", "York", ",", "in", "2024", "."]
    words = split_words("张伟在北京（Beijing）工作。")
    assert [w for w, _, _ in words] == ["张", "伟", "在", "北", "京", "（", "Beijing", "）", "工", "作", "。"]
    assert words[6] == ("Beijing", 6, 13)


@pytest.mark.slow
def test_classify_texts_files_and_json(heads, run, tmp_path):
    from lmforge.train.classify import load_task_model

    model = heads[0]
    rows = sentiment_rows(40, 7)
    (tmp_path / "reviews.txt").write_text("".join(r["text"] + "\n\n" for r in rows))  # blank lines are skipped
    code, out, err = run("classify", model, "--file", tmp_path / "reviews.txt")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 40
    labels = [line.split()[0] for line in lines]
    assert labels == load_task_model(model).classify([r["text"] for r in rows])  # the command is the library
    assert sum(label == r["label"] for label, r in zip(labels, rows)) >= 36
    assert all(0.5 <= float(line.split()[1]) <= 1 and line.endswith(r["text"]) for line, r in zip(lines, rows))

    code, out, _ = run("classify", model, "--text", "the film was good", "--text", "an awful film", "--json")
    first, second = map(json.loads, out.splitlines())
    assert (first["text"], first["label"], second["label"]) == ("the film was good", "pos", "neg")
    assert first["probability"] == max(first["probabilities"].values())
    assert sum(first["probabilities"].values()) == pytest.approx(1, abs=1e-5)

    records = [{"id": "doc-1", "url": "https://example.com/a", "review": "the film was great"},
               {"id": "doc-2", "url": "https://example.com/b", "review": "a poor and bad mind"}]
    jsonl = write_jsonl(tmp_path / "reviews.jsonl", records)
    code, out, err = run("classify", model, "--file", jsonl, "--text-field", "review", "--json")
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [{k: g[k] for k in ("id", "url", "review")} for g in got] == records  # input fields kept
    assert [g["label"] for g in got] == ["pos", "neg"]


@pytest.mark.slow
def test_tag_english_and_chinese_text(heads, run, tmp_path):
    model = heads[1]
    text = "张伟在北京讨论模型训练，李娜去了上海。"
    code, out, err = run("tag", model, "--text", text, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["entities"] == [{"text": "张伟", "type": "PER", "start": 0, "end": 2},
                               {"text": "北京", "type": "LOC", "start": 3, "end": 5},
                               {"text": "李娜", "type": "PER", "start": 12, "end": 14},
                               {"text": "上海", "type": "LOC", "start": 16, "end": 18}]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in got["entities"])
    assert [w["word"] for w in got["words"]][:3] == ["张", "伟", "在"] and got["words"][11]["word"] == "，"

    code, out, _ = run("tag", model, "--text", "alice and the sea to new york")
    tagged, found = out.splitlines()
    assert tagged == "alice/B-PER and/O the/O sea/O to/O new/B-LOC york/I-LOC"
    assert found == "  entities: PER 'alice', LOC 'new york'"

    # Pre-split words from JSONL on stdin, as the training data holds them; other fields kept.
    rows = ner_rows(20, 7)
    stdin = "".join(json.dumps({"id": i, "tokens": r["tokens"]}) + "\n" for i, r in enumerate(rows))
    code, out, err = run("tag", model, "--file", "-", "--json", stdin=stdin)
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [g["id"] for g in got] == list(range(20))
    correct = sum(w["tag"] == t for g, r in zip(got, rows) for w, t in zip(g["words"], r["tags"]))
    assert correct >= 0.9 * sum(len(r["tags"]) for r in rows)
    for g in got:  # offsets point into the words joined by spaces
        assert all(g["text"][e["start"]:e["end"]] == e["text"] for e in g["entities"])


@pytest.mark.slow
def test_mistakes_are_one_line(heads, run, tmp_path):
    classify_dir, tag_dir = heads
    cases = [
        (("classify", classify_dir), "give the text to label: --text TEXT"),
        (("tag", classify_dir, "--text", "x"), "holds a classify head; use lmforge classify"),
        (("classify", tag_dir, "--text", "x"), "holds a tag head; use lmforge tag"),
        (("classify", tmp_path, "--text", "x"), "has no task head"),
        (("tag", tmp_path / "no-such-model", "--text", "x"), "no-such-model not found"),
        (("classify", classify_dir, "--file", tmp_path / "missing.txt"), "missing.txt not found"),
    ]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    cases.append((("classify", classify_dir, "--file", tmp_path / "bad.jsonl"), "bad.jsonl:2 is not valid JSON"))
    (tmp_path / "nofield.jsonl").write_text('{"body": "fine"}\n')
    cases.append((("classify", classify_dir, "--file", tmp_path / "nofield.jsonl"),
                  "line 1: expected a JSON object with a string field 'text'"))
    for args, message in cases:
        code, out, err = run(*args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and out == "" and len(lines) == 1 and message in lines[0], (args, err)
