"""Each quality filter on hand-made documents: kept and removed cases, English and Chinese."""

import pytest
from clean_samples import CHINESE, ENGLISH, JAPANESE

from lmforge.data.clean.document import Document
from lmforge.data.clean.filters import build_filters
from lmforge.data.clean.filters.c4 import C4Filter, C4Params
from lmforge.data.clean.filters.fineweb import FineWebFilter, FineWebParams
from lmforge.data.clean.filters.gopher import (
    GopherQualityFilter,
    GopherQualityParams,
    GopherRepetitionFilter,
    GopherRepetitionParams,
    duplicated_ngram_char_fraction,
    top_ngram_char_fraction,
)
from lmforge.errors import LmforgeError

import numpy as np

QUALITY = GopherQualityFilter(GopherQualityParams())
REPETITION = GopherRepetitionFilter(GopherRepetitionParams())
C4 = C4Filter(C4Params())
FINEWEB = FineWebFilter(FineWebParams())


def doc(text, language="en"):
    return Document(text=text, id="t", language=language)


@pytest.mark.parametrize("quality_filter", [QUALITY, REPETITION, C4, FINEWEB], ids=lambda f: f.name)
@pytest.mark.parametrize("text,language", [(ENGLISH, "en"), (CHINESE, "zh"), (JAPANESE, "ja")])
def test_good_prose_is_kept_by_every_filter(quality_filter, text, language):
    assert quality_filter.apply(doc(text, language)) is None


# ------------------------------------------------------------------ Gopher quality


@pytest.mark.parametrize("text,reason", [
    ("The cat sat on the mat and that was all.", "min_doc_words"),
    (" ".join(["the extraordinarily"] * 30 + ["incomprehensibilities"] * 30), "max_avg_word_length"),
    (" ".join(["a b of to"] * 20), "min_avg_word_length"),
    (ENGLISH + " #tag" * 40, "max_symbol_word_ratio"),
    ("\n".join(f"- item number {i} of the list and the rest" for i in range(30)), "max_bullet_lines_ratio"),
    ("\n".join(f"and then the story went on and on{i}..." for i in range(10)) + "\n" + ENGLISH, "max_ellipsis_lines_ratio"),
    (" ".join(["the 123 456 789 101 112 131 415"] * 20), "max_non_alpha_words_ratio"),
    (" ".join(["Lorem dolor amet consectetur adipiscing elit sed eiusmod tempor incididunt"] * 8), "min_stop_words"),
])
def test_gopher_quality_removes(text, reason):
    assert QUALITY.apply(doc(text)) == reason


def test_gopher_quality_chinese_counts_segmented_words_and_its_own_stop_words():
    chinese = doc(CHINESE, "zh")
    assert chinese.words()[:6] == ["北京", "是", "中华人民共和国", "的", "首都", "也"]  # jieba's words, not characters
    # 40 Han characters make about 25 words: under the 50-word minimum
    assert QUALITY.apply(doc(CHINESE[:40], "zh")) == "min_doc_words"
    # a long Chinese text without any of 的/年/在/是/和/了/… is removed by the stop-word rule
    no_stop_words = "北京天坛故宫长城西湖黄山泰山" * 20
    assert QUALITY.apply(doc(no_stop_words, "zh")) == "min_stop_words"
    # FineWeb-2's word-length bounds for Chinese words (1-5 characters), not the English 3-10
    assert (QUALITY.params_for(chinese).min_avg_word_length, QUALITY.params_for(chinese).max_avg_word_length) == (1, 5)
    assert QUALITY.apply(chinese) is None


def test_gopher_quality_unknown_language_skips_the_stop_word_rule():
    text = " ".join(["Lorem dolor amet consectetur adipiscing elit sed eiusmod tempor incididunt"] * 8)
    assert QUALITY.apply(doc(text, "la")) is None


# ------------------------------------------------------------------ Gopher repetition


def test_gopher_repetition_duplicate_lines_and_paragraphs():
    lines = ENGLISH.split(". ")
    repeated_paragraphs = "\n\n".join([ENGLISH.split("\n\n")[0]] * 3 + [ENGLISH])
    assert REPETITION.apply(doc(repeated_paragraphs)) == "dup_para_frac"
    repeated_lines = "\n".join(lines[:3] + ["Click here to subscribe to our newsletter today."] * 4)
    assert REPETITION.apply(doc(repeated_lines)) == "dup_line_frac"


def test_gopher_repetition_ngrams_english_and_chinese():
    spam = ENGLISH + " " + " ".join(["buy cheap watches"] * 30)
    assert REPETITION.apply(doc(spam)) == "top_2_gram"
    chinese_spam = CHINESE + "便宜手表" * 40
    assert REPETITION.apply(doc(chinese_spam, "zh")) == "top_2_gram"
    # one long repeated passage (inside a paragraph, so not a duplicate line) → duplicated 5-grams
    passage = ENGLISH.split("\n\n")[0]
    looped = ENGLISH.replace("\n\n", " ") + " " + passage + " " + passage
    assert REPETITION.apply(doc(looped)) == "dup_5_gram"


def test_ngram_fractions_are_exact_on_a_small_case():
    words = "a b a b c".split()
    ids = np.array([0, 1, 0, 1, 2], dtype=np.uint64)
    lengths = np.ones(5, dtype=np.int64)
    # top 2-gram "a b" occurs twice: 2 occurrences × 2 chars / 5 chars
    assert top_ngram_char_fraction(ids, lengths, 2) == pytest.approx(0.8)
    # the second "a b" (positions 2-3) is a repeated 2-gram: 2 of 5 characters
    assert duplicated_ngram_char_fraction(ids, lengths, 2) == pytest.approx(0.4)
    assert duplicated_ngram_char_fraction(ids, lengths, 3) == 0.0
    assert len(words) == 5


# ------------------------------------------------------------------ C4


def test_c4_drops_lines_and_documents():
    assert C4.apply(doc(ENGLISH + "\nLorem ipsum dolor sit amet.")) == "lorem_ipsum"
    assert C4.apply(doc(ENGLISH + "\nfunction f() { return 1; }")) == "curly_bracket"
    d = doc(ENGLISH + "\nPlease enable JavaScript to view this page.\nRead our privacy policy here.\nMenu\n"
            "Paris was the capital[1] of France[citation needed].")
    assert C4.apply(d) is None
    assert "JavaScript" not in d.text and "privacy policy" not in d.text and "\nMenu" not in d.text
    assert "Paris was the capital of France." in d.text  # citation markers removed
    assert C4.apply(doc("One sentence here. Two sentences here. Three here.")) == "min_num_sentences"


def test_c4_terminal_punctuation_rule_is_off_by_default_as_in_fineweb():
    heading = "A heading without a full stop"
    assert C4.apply(d := doc(heading + "\n" + ENGLISH)) is None and heading in d.text
    strict = C4Filter(C4Params(filter_no_terminal_punct=True))
    assert strict.apply(d := doc(heading + "\n" + ENGLISH)) is None and heading not in d.text


def test_c4_counts_sentences_in_chinese_and_not_at_decimal_points():
    from lmforge.data.clean.text import SENTENCE_END_RE

    assert len(SENTENCE_END_RE.findall("北京是中国的首都。我们在这里生活！你去过吗？")) == 3
    assert len(SENTENCE_END_RE.findall("他说：“我明天就走。”然后离开了。")) == 2
    assert len(SENTENCE_END_RE.findall("Version 3.5 of Node.js is out. See www.example.org for more.")) == 2
    # FineWeb-2 applies no C4 document rule outside English: a short Chinese news item stays
    two_sentences = "北京是中国的首都，有三千多年的建城史和八百多年的建都史。我们在这里生活和工作，感受到了这座城市的活力。"
    assert C4.apply(doc(two_sentences, "zh")) is None
    # where a recipe asks for a minimum, Chinese sentences are counted at 。！？
    strict = C4Filter(C4Params(by_language={"zh": {"min_num_sentences": 3}}))
    assert strict.apply(doc(two_sentences, "zh")) == "min_num_sentences"
    assert strict.apply(doc(two_sentences + "你去过北京吗？", "zh")) is None
    assert strict.apply(doc("int main() { return 0; } 这是一段代码。" * 3, "zh")) is None  # no curly-bracket rule


# ------------------------------------------------------------------ FineWeb


def test_fineweb_rules():
    no_punct = "\n".join(f"Product {i} in stock now with free shipping and returns" for i in range(20))
    assert FINEWEB.apply(doc(no_punct)) == "line_punct_ratio"
    short_lines = "\n".join(["Home.", "About us.", "Contact.", "Log in."] * 3 + [ENGLISH])
    assert FINEWEB.apply(doc(short_lines)) == "short_line_ratio"
    dup = ENGLISH + "\n" + "Share this article with your friends on social media today.\n" * 2
    assert FINEWEB.apply(doc(dup)) == "char_dup_ratio"
    # long lines (not "short") but about three words each: 25 newlines / 78 words > 0.3
    listy = "\n".join(f"Extraordinarily-comprehensive documentation {w}." for w in "abcdefghijklmnopqrstuvwxyz")
    assert FINEWEB.apply(doc(listy)) == "list_ratio"


def test_fineweb_chinese_takes_fineweb2_settings():
    title = "北京城市简介"
    page = "\n".join([title, title, CHINESE])  # the page title repeated as its heading: 3% of the characters
    assert FINEWEB.apply(doc(page, "zh")) is None  # FineWeb-2 allows 10% of characters in duplicated lines
    assert FINEWEB.apply(doc(page, "en")) == "char_dup_ratio"  # FineWeb's English limit is 1%
    short_lines = "\n".join([f"第{i}条新闻的标题。" for i in range(8)] + [CHINESE])
    assert FINEWEB.params_for(doc(short_lines, "zh")).short_line_thr is None  # off, as in FineWeb-2
    assert FINEWEB.apply(doc(short_lines, "zh")) is None
    assert FINEWEB.params_for(doc("", "zh")).line_punct_thr == 0.106


# ------------------------------------------------------------------ configuration


def test_filters_are_switchable_and_configurable_per_language():
    filters = build_filters({"gopher_quality": {"min_doc_words": 5, "by_language": {"zh": {"min_doc_words": 100}}},
                             "c4": {"enabled": False}})
    assert [f.name for f in filters] == ["gopher_quality"]
    quality = filters[0]
    assert quality.apply(doc("The cat sat on the mat and that was all.")) is None
    assert quality.apply(doc(CHINESE[:60], "zh")) == "min_doc_words"
    # the recipe's zh override is merged over the built-in one (FineWeb-2's word lengths stay)
    assert quality.params_for(doc("", "zh")).min_avg_word_length == 1


def test_unknown_filter_or_parameter_is_one_clear_error():
    with pytest.raises(LmforgeError, match="unknown filter 'gopher_qualty'"):
        build_filters({"gopher_qualty": {}})
    with pytest.raises(LmforgeError, match="min_doc_wrds"):
        build_filters({"gopher_quality": {"min_doc_wrds": 3}})


def test_duplicated_ngram_fraction_never_grows_with_n():
    """The early exit in the repetition filter relies on this."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, rng.integers(2, 12), size=rng.integers(5, 80)).astype(np.uint64)
        lengths = rng.integers(1, 9, size=len(ids))
        fractions = [duplicated_ngram_char_fraction(ids, lengths, n) for n in range(2, 11)]
        assert all(a >= b for a, b in zip(fractions, fractions[1:]))
