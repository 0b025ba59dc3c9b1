"""Language identification: the script decides Chinese, Japanese and Korean; py3langid the rest.

A Chinese technical paragraph with English terms in brackets has as many Latin letters as
Han characters, and a character-n-gram classifier trained on whole-language text hesitates
on it (py3langid gives such paragraphs ~0.5, or calls them Wu Chinese). Yet its grammar,
the words that hold each sentence together, is Chinese. So the text is judged sentence by
sentence (pieces between 。！？!?;； and line ends, of the first `max_chars` characters):

- a piece is CJK when it has at least as many CJK characters (Han, kana, Hangul) as words
  in other scripts: "在 PyTorch 中，我们用 DataLoader 加载数据" is CJK, "the word 你好 means
  hello" is not;
- the CJK share is the part of the text's units (one CJK character or one other word each)
  that lies in CJK pieces. At 0.5 or more the document is `ja` when kana are at least a tenth
  of its CJK characters, `ko` when Hangul dominates, else `zh`; its score is the CJK share;
- below 0.5, py3langid classifies the other pieces, and the score is its probability times
  the part of the text outside CJK pieces.

So a score is the share of the text written in the language found, at the classifier's
confidence; for single-language text it is py3langid's probability (or 1.0 for CJK).

Chinese is one language here, `zh`: Mandarin, Cantonese, Wu and the other varieties, in
simplified or traditional characters. A classifier's variant labels (`wuu`, `yue`, `cmn`,
`zh-Hant`, ...) and the same codes given in `langid.languages` all mean `zh`.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lmforge.data.clean.document import Document

_CHINESE_VARIANTS = frozenset({
    "zh", "zho", "chi", "cmn", "yue", "wuu", "hak", "nan", "gan", "hsn", "cdo", "cjy", "cpx", "czh", "mnp", "lzh",
})
_PIECE_END_RE = re.compile(r"[。！？!?;；\n]+|\.(?=\s)")
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_KANA = "\u3040-\u30ff"
_HANGUL = "\uac00-\ud7af"
_CJK_CHAR_RE = re.compile(f"[{_HAN}{_KANA}{_HANGUL}]")
_KANA_RE = re.compile(f"[{_KANA}]")
_HANGUL_RE = re.compile(f"[{_HANGUL}]")
# a run of letters outside the CJK scripts (digits and underscores are not letters)
_OTHER_WORD_RE = re.compile(f"[^\\W\\d_{_HAN}{_KANA}{_HANGUL}]+")
_KANA_SHARE_FOR_JA = 0.1


def normalize_code(code: str) -> str:
    """A language code as lmforge reports it: lower case; every Chinese variant and script is `zh`."""
    code = code.strip().lower().replace("_", "-")
    return "zh" if code in _CHINESE_VARIANTS or code.split("-")[0] in _CHINESE_VARIANTS else code


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)


def _classify(text: str) -> tuple[str, float]:
    language, score = _identifier().classify(text)
    return normalize_code(language), float(score)


def identify(text: str, max_chars: int = 1000) -> tuple[str, float]:
    """(ISO 639-1 code, score in [0, 1]) for the first `max_chars` characters of `text`."""
    head = text[:max_chars]
    cjk_units = other_units = 0
    cjk_pieces, other_pieces = [], []
    for piece in _PIECE_END_RE.split(head):
        cjk = len(_CJK_CHAR_RE.findall(piece))
        other = len(_OTHER_WORD_RE.findall(piece))
        if cjk == other == 0:
            continue  # numbers and symbols say nothing about the language
        if cjk >= other:
            cjk_units += cjk + other
            cjk_pieces.append(piece)
        else:
            other_units += cjk + other
            other_pieces.append(piece)
    if cjk_units + other_units == 0:
        return _classify(head)
    cjk_share = cjk_units / (cjk_units + other_units)
    if cjk_share >= 0.5:
        cjk_text = "".join(cjk_pieces)
        kana = len(_KANA_RE.findall(cjk_text))
        hangul = len(_HANGUL_RE.findall(cjk_text))
        cjk_chars = len(_CJK_CHAR_RE.findall(cjk_text))
        if hangul * 2 > cjk_chars:
            language = "ko"
        elif kana >= _KANA_SHARE_FOR_JA * (cjk_chars - hangul):
            language = "ja"
        else:
            language = "zh"
        return language, cjk_share
    language, probability = _classify("\n".join(other_pieces))
    return language, probability * (1.0 - cjk_share)


def label(doc: Document, max_chars: int = 1000) -> None:
    doc.language, doc.language_score = identify(doc.text, max_chars)


def keep(doc: Document, languages: list[str] | None, min_score: float) -> str | None:
    """None to keep, or the reason the document is dropped."""
    if languages is None:
        return None
    if doc.language not in languages:
        return "other_language"
    if doc.language_score < min_score:
        return "low_score"
    return None
