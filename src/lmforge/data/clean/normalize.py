"""Text normalization: mojibake, Unicode form, control characters, whitespace, HTML, Gutenberg.

Order matters: mojibake is repaired before Unicode normalization (ftfy must see the
original code points), and whitespace is tidied last, after HTML and boilerplate removal.

NFKC makes full-width letters and digits ASCII (ｆｕｌｌ１２３ -> full123), which is wanted,
but it would also turn the full-width punctuation that Chinese and Japanese are written
with into ASCII (，：；！？（）～ -> ,:;!?()~, and the ellipsis … -> ...), changing the text
of every Chinese document; `keep_cjk_punctuation` (on by default) leaves those characters
as they are.
"""

from __future__ import annotations

import html
import re
import unicodedata
from html.parser import HTMLParser

import ftfy

from lmforge.data.clean.recipe import NormalizeConfig

# C0/C1 controls except tab and newline, and invisible format characters that carry no text
# (zero-width space, BOM, soft hyphen, bidi marks); the zero-width joiner stays for emoji.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\u2060\ufeff]")
_SPACES_RE = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_TRAILING_SPACE_RE = re.compile(r" *\n *")
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_GUTENBERG_START_RE = re.compile(r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*?\*{3}[^\n]*\n", re.I | re.M)
_GUTENBERG_END_RE = re.compile(r"^\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG", re.I | re.M)
_HTML_HINT_RE = re.compile(r"<(?:html|body|div|p|br|span|a|table|li|h[1-6])\b", re.I)
# punctuation of CJK text that the compatibility forms (NFKC, NFKD) would make ASCII
_CJK_PUNCTUATION_RE = re.compile("([\uff0c\uff1a\uff1b\uff01\uff1f\uff08\uff09\uff5e\u2026]+)")


class _TextExtractor(HTMLParser):
    """Visible text of an HTML page: drops script/style/head, breaks lines at block tags."""

    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "table", "ul", "ol", "pre", "blockquote", "title"}
    _SKIP = {"script", "style", "noscript", "head", "template", "svg"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_to_text(text: str) -> str:
    if not _HTML_HINT_RE.search(text):
        return html.unescape(text) if "&" in text else text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def strip_gutenberg(text: str) -> str:
    """Keep only the book between Project Gutenberg's START and END markers, if present."""
    start = _GUTENBERG_START_RE.search(text)
    if start is None:
        return text
    end = _GUTENBERG_END_RE.search(text, start.end())
    return text[start.end() : end.start() if end else len(text)]


def tidy_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES_RE.sub(" ", text)
    text = _TRAILING_SPACE_RE.sub("\n", text)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


def unicode_normalize(text: str, form: str, keep_cjk_punctuation: bool = True) -> str:
    if not keep_cjk_punctuation or form in ("NFC", "NFD") or _CJK_PUNCTUATION_RE.search(text) is None:
        return unicodedata.normalize(form, text)
    pieces = _CJK_PUNCTUATION_RE.split(text)  # odd indices are the punctuation runs, kept as they are
    return "".join(piece if i % 2 else unicodedata.normalize(form, piece) for i, piece in enumerate(pieces))


def normalize(text: str, config: NormalizeConfig) -> str:
    if config.fix_mojibake and not text.isascii():
        text = ftfy.fix_encoding(text)  # only the encoding fixes; fix_text's other changes alter style
    if config.html_to_text:
        text = html_to_text(text)
    if config.unicode_form != "none":
        text = unicode_normalize(text, config.unicode_form, config.keep_cjk_punctuation)
    if config.strip_control:
        text = _CONTROL_RE.sub("", text)
    if config.gutenberg and "GUTENBERG" in text[:20000].upper():
        text = strip_gutenberg(text)
    if config.whitespace:
        text = tidy_whitespace(text)
    return text
