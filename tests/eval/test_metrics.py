"""Text and code metrics against hand computation and the libraries' own published values."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from rouge_score.rouge_scorer import RougeScorer

from lmforge.errors import LmforgeError
from lmforge.eval.metrics import (CJKTokenizer, bleu, bleu_tokenizer, chrf, exact_match, normalize_answer, pass_at_k,
                                  rouge, score_texts, token_f1)


def test_sacrebleu_readme_example():
    # sacrebleu's README: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ...), chrF2 = 59.73.
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "The dog had bit the man."],
            ["It was not unexpected.", "No one was surprised."],
            ["The man bit him first.", "The man had bitten the dog."]]
    assert round(bleu(hyps, refs)[0] * 100, 2) == 48.53
    assert round(chrf(hyps, refs)[0] * 100, 2) == 59.73


def test_bleu_by_hand_english_and_chinese():
    # 1-4 gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    corpus, (sentence,) = bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus == pytest.approx(expected, abs=1e-6) and sentence == pytest.approx(expected, abs=1e-6)
    # Chinese references switch sacrebleu to its zh tokenizer: one token per character,
    # precisions 4/6, 3/5, 2/4, 1/3. Without it the whole sentence is one token and BLEU is 0.
    assert bleu_tokenizer([["今天天气不错"]]) == "zh" and bleu_tokenizer([["fine"]]) == "13a"
    zh, _ = bleu(["今天天气很好"], [["今天天气不错"]])
    assert zh == pytest.approx((4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    # Examples with different numbers of references.
    score, per = bleu(["a b c d", "x y z w"], [["a b c d"], ["x y z w", "q q q q"]])
    assert score == pytest.approx(1.0) and per == pytest.approx([1.0, 1.0])


def test_chrf_on_chinese_and_identity():
    score, (same, other) = chrf(["模型训练完成", "模型训练完成"], [["模型训练完成"], ["数据清洗开始"]])
    assert same == pytest.approx(1.0) and other == 0.0
    assert 0 < score < 1


def test_rouge_published_values():
    # rouge-score's own unit tests (rouge_scorer_test.py): target "testing one two".
    assert rouge(["testing"], [["testing one two"]], ("rouge1",))["rouge1"][0] == pytest.approx(1 / 2)
    assert rouge(["testing one"], [["testing one two"]], ("rouge2",))["rouge2"][0] == pytest.approx(2 / 3)
    assert rouge(["testing one"], [["testing one two"]], ("rougeL",))["rougeL"][0] == pytest.approx(4 / 5)
    assert rouge(["testing two"], [["testing one two"]], ("rougeL",))["rougeL"][0] == pytest.approx(4 / 5)


def test_rouge_by_hand_and_equal_to_rouge_score_on_ascii():
    r = rouge(["the cat was found under the bed"], [["the cat was under the bed"]])
    assert r["rouge1"][0] == pytest.approx(12 / 13)  # P 6/7, R 6/6
    assert r["rouge2"][0] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    # Chinese: rouge-score's default tokenizer finds no tokens at all; by character, 4 of 6 shared.
    assert RougeScorer(["rouge1"]).score("今天天气不错", "今天天气很好")["rouge1"].fmeasure == 0.0
    zh = rouge(["今天天气很好"], [["今天天气不错"]])
    assert zh["rouge1"][0] == pytest.approx(2 / 3) and zh["rouge2"][0] == pytest.approx(3 / 5)
    assert zh["rougeL"][0] == pytest.approx(2 / 3)
    # On ASCII text the tokenizer is rouge-score's own, so the scores are too.
    pairs = [("The quick brown fox, 3 times!", "A quick brown dog jumped 3 times."),
             ("Tokenizers split text into pieces (BPE).", "BPE tokenizers split text into sub-word pieces.")]
    default = RougeScorer(["rouge1", "rouge2", "rougeL"])
    ours = rouge([p for p, _ in pairs], [[t] for _, t in pairs])
    for i, (pred, target) in enumerate(pairs):
        for kind, s in default.score(target, pred).items():
            assert ours[kind][1][i] == pytest.approx(s.fmeasure)
    assert CJKTokenizer().tokenize("Transformer 模型的 Attention") == ["transformer", "模", "型", "的", "attention"]


def test_exact_match_and_f1_squad_style():
    assert normalize_answer("The  Eiffel Tower!") == ["eiffel", "tower"]
    assert exact_match("the Eiffel Tower!", ["Eiffel tower"]) == 1.0
    assert exact_match("Paris", ["Rome", "paris."]) == 1.0 and exact_match("Paris, France", ["Paris"]) == 0.0
    assert token_f1("Eiffel Tower in Paris", ["the Eiffel Tower"]) == pytest.approx(2 / 3)  # P 2/4, R 2/2
    assert token_f1("nothing", ["the Eiffel Tower"]) == 0.0
    # Chinese by character, punctuation (full-width too) dropped.
    assert exact_match("北 京。", ["北京"]) == 1.0
    assert token_f1("北京大学", ["北京"]) == pytest.approx(2 / 3)  # P 2/4, R 2/2
    assert token_f1("使用 GPU 训练", ["GPU训练"]) == pytest.approx(2 * (3 / 5) * 1 / (3 / 5 + 1))
    task, per = score_texts(["exact_match", "f1"], ["北京", "上海"], [["北京"], ["北京"]])
    assert task == {"exact_match": 0.5, "f1": 0.5} and per[1] == {"exact_match": 0.0, "f1": 0.0}
    with pytest.raises(LmforgeError, match="unknown metric 'meteor'"):
        score_texts(["meteor"], ["a"], [["a"]])


def closed_form(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_equals_the_closed_form():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(closed_form(n, c, k)), abs=1e-12)
    # Large n, where the binomials have hundreds of digits.
    for c, k in [(1, 1), (3, 10), (17, 100), (0, 50), (199, 100)]:
        assert pass_at_k(200, c, k) == pytest.approx(float(closed_form(200, c, k)), rel=1e-9, abs=1e-15)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the pass rate
    with pytest.raises(LmforgeError, match="1 <= k <= n"):
        pass_at_k(5, 1, 6)
