"""Normalization steps and language identification."""

from clean_samples import CHINESE, ENGLISH, JAPANESE

from lmforge.data.clean.document import Document
from lmforge.data.clean.langid import identify, keep
from lmforge.data.clean.normalize import html_to_text, normalize, strip_gutenberg
from lmforge.data.clean.recipe import NormalizeConfig

DEFAULT = NormalizeConfig()


def test_mojibake_is_repaired_and_nfkc_applied():
    assert normalize("The cafÃ© serves crÃ¨me brÃ»lÃ©e.", DEFAULT) == "The café serves crème brûlée."
    assert normalize("ｆｕｌｌｗｉｄｔｈ １２３ ﬁne", DEFAULT) == "fullwidth 123 fine"
    assert normalize("ｆｕｌｌｗｉｄｔｈ", NormalizeConfig(unicode_form="NFC")) == "ｆｕｌｌｗｉｄｔｈ"


def test_nfkc_keeps_the_punctuation_chinese_is_written_with():
    text = "合适的预热长度取决于批大小（batch size）：经验上……先取总步数的百分之一！对吗？ｆｕｌｌ１２３～"
    assert normalize(text, DEFAULT) == "合适的预热长度取决于批大小（batch size）：经验上……先取总步数的百分之一！对吗？full123～"
    assert normalize(text, NormalizeConfig(keep_cjk_punctuation=False)) == (
        "合适的预热长度取决于批大小(batch size):经验上......先取总步数的百分之一!对吗?full123~")
    assert normalize(CHINESE, DEFAULT) == CHINESE  # a Chinese text in its usual forms is left as it is


def test_control_characters_and_whitespace():
    raw = "\ufeffHello\u200b world\x00\x07 \t again  \r\nnext line   \n\n\n\n\nlast\x1b"
    assert normalize(raw, DEFAULT) == "Hello world again\nnext line\n\nlast"


def test_html_to_text_is_optional():
    page = "<html><head><title>T</title><style>p{}</style></head><body><p>First &amp; one.</p><script>x()</script><div>Second</div></body></html>"
    assert html_to_text(page).split() == ["First", "&", "one.", "Second"]
    assert "<p>" in normalize(page, DEFAULT)
    assert normalize(page, NormalizeConfig(html_to_text=True)) == "First & one.\n\nSecond"


def test_gutenberg_boilerplate_is_stripped():
    book = ("The Project Gutenberg eBook of Test\nThis eBook is for the use of anyone anywhere.\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\nChapter 1\nIt was a dark night.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\nSection 1. General Terms of Use.\n")
    assert strip_gutenberg(book).strip() == "Chapter 1\nIt was a dark night."
    assert normalize(book, DEFAULT) == "Chapter 1\nIt was a dark night."
    assert "Terms of Use" in normalize(book, NormalizeConfig(gutenberg=False))


def test_language_identification_and_filtering():
    for text, expected in ((ENGLISH, "en"), (CHINESE, "zh"), (JAPANESE, "ja")):
        language, score = identify(text)
        assert language == expected and score > 0.9
    zh = Document(CHINESE, "x", *identify(CHINESE))
    assert keep(zh, None, 0.65) is None
    assert keep(zh, ["en", "zh"], 0.65) is None
    assert keep(zh, ["en"], 0.65) == "other_language"
    assert keep(Document("zz", "y", "en", 0.3), ["en"], 0.65) == "low_score"
