"""Words as tagging corpora split them, and the text they make again (Chinese without spaces)."""

from lmforge.data.words import join_words, split_words, word_texts


def test_chinese_words_join_back_into_the_text_as_written():
    text = "张伟在北京（Beijing）参加 PyTorch 大会。"
    words = [w for w, _, _ in split_words(text)]
    joined, spans = join_words(words)
    assert joined == "张伟在北京（Beijing）参加PyTorch大会。"  # only the spaces between Latin and Han words go
    assert all(joined[a:b] == w for w, a, b in spans)
    assert word_texts(["张", "伟", "在"]) == ["张", "伟", "在"]


def test_latin_words_are_spaced_as_conll_corpora_hold_them():
    words = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    joined, spans = join_words(words)
    assert joined == "EU rejects German call to boycott British lamb ."
    assert spans[1] == ("rejects", 3, 10) and spans[-1] == (".", 47, 48)
    assert word_texts(words)[:2] == ["EU", " rejects"]


def test_japanese_kana_and_fullwidth_punctuation_are_character_words():
    words = [w for w, _, _ in split_words("東京タワーへ行く。")]
    assert len(words) == 9 and join_words(words)[0] == "東京タワーへ行く。"
