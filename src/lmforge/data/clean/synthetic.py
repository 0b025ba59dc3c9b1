"""A generated corpus with planted near-duplicates, for the dedup benchmark and the tests.

English-like documents come from a Zipf-distributed pseudo-word vocabulary mixed with real
function words (so they pass the quality filters); Chinese-like ones from common Han
characters. Variants of some documents are planted: word/character substitutions at a
chosen rate, shuffled paragraphs, or a partial rewrite (a hard negative, below threshold).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

_FUNCTION_WORDS = "the of and to a in that is was he for it with as his on be at by had have this from or".split()
_HAN = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面"
        "而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性"
        "好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第"
        "向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管"
        "特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处"
        "队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风"
        "切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步")


def _zipf_vocabulary(rng: random.Random, size: int) -> tuple[list[str], list[float]]:
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = set()
    while len(words) < size:
        length = max(2, min(11, int(rng.gauss(5.5, 2))))
        words.add("".join(rng.choice(letters[: rng.randint(8, 26)]) for _ in range(length)))
    vocabulary = _FUNCTION_WORDS + sorted(words)
    weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(vocabulary))]
    return vocabulary, list(itertools.accumulate(weights))


@dataclass
class SyntheticCorpus:
    texts: list[str]
    languages: list[str]
    # (original index, variant index, kind) for every planted variant
    planted: list[tuple[int, int, str]]


class _Writer:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.vocabulary, self.cum_weights = _zipf_vocabulary(self.rng, 20_000)

    def english(self, paragraphs: int) -> str:
        out = []
        for _ in range(paragraphs):
            sentences = []
            for _ in range(self.rng.randint(3, 6)):
                words = self.rng.choices(self.vocabulary, cum_weights=self.cum_weights, k=self.rng.randint(8, 20))
                sentences.append(" ".join(words).capitalize() + ".")
            out.append(" ".join(sentences))
        return "\n\n".join(out)

    def chinese(self, paragraphs: int) -> str:
        out = []
        for _ in range(paragraphs):
            sentences = ["".join(self.rng.choice(_HAN) for _ in range(self.rng.randint(12, 30))) + "。"
                         for _ in range(self.rng.randint(3, 6))]
            out.append("".join(sentences))
        return "\n\n".join(out)

    def substitute(self, text: str, rate: float, chinese: bool) -> str:
        if chinese:
            chars = list(text)
            for i, ch in enumerate(chars):
                if ch not in "。\n" and self.rng.random() < rate:
                    chars[i] = self.rng.choice(_HAN)
            return "".join(chars)
        paragraphs = []
        for paragraph in text.split("\n\n"):
            words = paragraph.split(" ")
            for i in range(len(words)):
                if self.rng.random() < rate:
                    words[i] = self.rng.choices(self.vocabulary, cum_weights=self.cum_weights)[0]
            paragraphs.append(" ".join(words))
        return "\n\n".join(paragraphs)

    def shuffle_paragraphs(self, text: str) -> str:
        paragraphs = text.split("\n\n")
        self.rng.shuffle(paragraphs)
        return "\n\n".join(paragraphs)

    def rewrite_part(self, text: str, share: float, chinese: bool) -> str:
        paragraphs = text.split("\n\n")
        fresh = self.chinese if chinese else self.english
        keep = max(1, int(len(paragraphs) * (1 - share)))
        return "\n\n".join(paragraphs[:keep] + [fresh(1) for _ in range(len(paragraphs) - keep)])


def generate(n_docs: int, *, duplicate_share: float = 0.2, chinese_share: float = 0.2, seed: int = 0,
             paragraphs: tuple[int, int] = (3, 8)) -> SyntheticCorpus:
    """`n_docs` originals plus planted variants of `duplicate_share` of them, shuffled together."""
    writer = _Writer(seed)
    rng = writer.rng
    originals = []
    for _ in range(n_docs):
        chinese = rng.random() < chinese_share
        n_par = rng.randint(*paragraphs)
        originals.append((writer.chinese(n_par) if chinese else writer.english(n_par), "zh" if chinese else "en"))
    texts = [t for t, _ in originals]
    languages = [lang for _, lang in originals]
    planted = []
    for index in rng.sample(range(n_docs), int(n_docs * duplicate_share)):
        text, lang = originals[index]
        chinese = lang == "zh"
        kind = rng.choice(["edit", "edit", "shuffle", "edit+shuffle", "rewrite"])
        if kind == "edit":
            variant = writer.substitute(text, rng.uniform(0.002, 0.02), chinese)
        elif kind == "shuffle":
            variant = writer.shuffle_paragraphs(text)
        elif kind == "edit+shuffle":
            variant = writer.shuffle_paragraphs(writer.substitute(text, rng.uniform(0.002, 0.01), chinese))
        else:  # a hard negative: most of it rewritten, similarity well under any threshold
            variant = writer.rewrite_part(text, 0.6, chinese)
        texts.append(variant)
        languages.append(lang)
        planted.append((index, len(texts) - 1, kind))
    order = list(range(len(texts)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    return SyntheticCorpus([texts[i] for i in order], [languages[i] for i in order],
                           [(position[a], position[b], kind) for a, b, kind in planted])
