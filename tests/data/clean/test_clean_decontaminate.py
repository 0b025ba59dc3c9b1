"""Decontamination: documents sharing a 13-gram with evaluation data are removed."""

import json

from clean_samples import CHINESE, ENGLISH

from lmforge.data.clean import clean, load_recipe
from lmforge.data.clean.decontaminate import eval_ngrams, is_contaminated
from lmforge.data.clean.recipe import DecontaminateConfig

QUESTION = "Which river flows through the old town with its narrow streets and the famous bridge today"


def test_thirteen_gram_overlap(tmp_path):
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": QUESTION}) + "\n")
    config = DecontaminateConfig(eval_files=[str(tmp_path / "eval.jsonl")], eval_text_field="question")
    grams = eval_ngrams(config)
    assert len(grams) == len(QUESTION.split()) - 13 + 1
    words = QUESTION.split()
    assert is_contaminated("Intro text. " + " ".join(words[2:15]) + " and more.", grams, 13)  # 13 words in a row
    assert not is_contaminated("Intro text. " + " ".join(words[2:14]) + " and more.", grams, 13)  # only 12
    assert not is_contaminated(ENGLISH, grams, 13)


def test_pipeline_removes_contaminated_documents(tmp_path):
    (tmp_path / "eval.txt").write_text(ENGLISH.split("\n\n")[1])
    with open(tmp_path / "train.jsonl", "w") as f:
        for text in (ENGLISH, CHINESE):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    recipe = load_recipe(decontaminate={"eval_files": [str(tmp_path / "eval.txt")]}, output={"plots": False})
    stats = clean([str(tmp_path / "train.jsonl")], tmp_path / "out", recipe)
    assert stats["steps"]["decontaminate"]["reasons"] == {"eval_ngram_overlap": 1}
    assert stats["docs_out"] == 1 and stats["accounting_ok"]
