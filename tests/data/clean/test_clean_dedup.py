"""Exact and near-duplicate detection on planted duplicates, English and Chinese."""

import random

import numpy as np
import pytest
from clean_samples import CHINESE, ENGLISH

from lmforge.data.clean.dedup import EXACT, KEEP, NEAR, connected_components, deduplicate, exact_key
from lmforge.data.clean.minhash import MinHasher, estimated_jaccard, ngram_hashes, token_hashes
from lmforge.data.clean.synthetic import generate

HASHER = MinHasher(112, ngram=5, seed=1)


def jaccard(a: str, b: str) -> float:
    x, y = set(ngram_hashes(token_hashes(a), 5).tolist()), set(ngram_hashes(token_hashes(b), 5).tolist())
    return len(x & y) / len(x | y)


def run(texts, threshold=0.8, bands=14, rows=8):
    signatures = np.stack([HASHER.signature(t) for t in texts])
    hashes = np.array([exact_key(t) for t in texts], dtype=np.uint64)
    return deduplicate(signatures, hashes, exact=True, near=True, bands=bands, rows=rows, threshold=threshold)


def reference_token_hashes(text: str) -> np.ndarray:
    """The slow, obvious version: regex tokens, a polynomial over code points, then the mixer."""
    from lmforge.data.clean.minhash import _mix
    from lmforge.data.clean.text import words

    prime, modulus = 0x100000001B3, 2**64
    values = [(sum(ord(c) * pow(prime, k, modulus) for k, c in enumerate(token)) + len(token)) % modulus
              for token in words(text.lower())]
    return _mix(np.array(values, dtype=np.uint64))


def test_vectorized_tokens_match_the_regex_tokenizer():
    rng = random.Random(0)
    alphabet = "ab c-'’_1世界。 \n,Ωéテ"
    texts = [ENGLISH, CHINESE, "Don't stop--well-known 'quoted' end- -start İstanbul x\ud800y 한국어", "", " ... "]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(500)]
    for text in texts:
        assert np.array_equal(token_hashes(text), reference_token_hashes(text)), text


def test_exact_duplicates_ignore_case_and_whitespace():
    texts = [ENGLISH, ENGLISH.upper(), ENGLISH.replace(" ", "  \n"), CHINESE, CHINESE]
    result = run(texts)
    assert result.verdict.tolist() == [KEEP, EXACT, EXACT, KEEP, EXACT]


def test_signature_estimates_jaccard_for_words_and_chinese_characters():
    corpus = generate(40, duplicate_share=1.0, chinese_share=0.5, seed=3)
    errors = []
    for a, b, _ in corpus.planted:
        true = jaccard(corpus.texts[a], corpus.texts[b])
        estimate = estimated_jaccard(HASHER.signature(corpus.texts[a]), HASHER.signature(corpus.texts[b]))
        errors.append(abs(true - estimate))
    assert np.mean(errors) < 0.04 and max(errors) < 0.15  # standard error of 112 hashes is ≤ 0.047
    # a Chinese text with one character in 50 changed shares ~80% of its character 5-grams
    edited = "".join("是" if i % 50 == 25 else ch for i, ch in enumerate(CHINESE * 3))
    assert 0.7 < jaccard(CHINESE * 3, edited) < 0.9


def test_planted_near_duplicates_are_found_and_hard_negatives_kept():
    corpus = generate(400, duplicate_share=0.3, chinese_share=0.3, seed=7)
    result = run(corpus.texts)
    # a variant can come out unchanged (a shuffle that kept the order): those are exact duplicates
    exact = {(min(a, b), max(a, b)) for a, b, _ in corpus.planted if exact_key(corpus.texts[a]) == exact_key(corpus.texts[b])}
    assert (result.verdict == EXACT).sum() == len(exact)
    found = {tuple(p) for p in result.verified_pairs.tolist()} | exact
    above = [(min(a, b), max(a, b)) for a, b, _ in corpus.planted if jaccard(corpus.texts[a], corpus.texts[b]) >= 0.85]
    below = [(min(a, b), max(a, b)) for a, b, _ in corpus.planted if jaccard(corpus.texts[a], corpus.texts[b]) < 0.6]
    assert len(above) > 60 and len(below) > 10
    recall = sum(p in found for p in above) / len(above)
    assert recall >= 0.97
    assert not any(p in found for p in below)
    planted = {(min(a, b), max(a, b)) for a, b, _ in corpus.planted}
    assert found <= planted  # no unrelated documents were merged
    # one representative per cluster: the document that came first, the later one is removed
    for a, b in found - exact:
        assert result.verdict[a] == KEEP and result.verdict[b] == NEAR
        assert result.cluster_size[a] == result.cluster_size[b] == 2
    assert (result.verdict == NEAR).sum() == len(found - exact)
    kinds = {kind for a, b, kind in corpus.planted if (min(a, b), max(a, b)) in found}
    assert {"edit", "shuffle", "edit+shuffle"} <= kinds and "rewrite" not in kinds


def test_threshold_trades_recall_for_precision():
    corpus = generate(200, duplicate_share=0.5, chinese_share=0.3, seed=11)
    loose = run(corpus.texts, threshold=0.0)
    strict = run(corpus.texts, threshold=0.95)
    assert len(strict.verified_pairs) < len(loose.verified_pairs)
    for a, b in strict.verified_pairs.tolist():
        assert jaccard(corpus.texts[a], corpus.texts[b]) > 0.8


def test_clusters_are_connected_components_with_the_first_document_kept():
    labels = connected_components(7, np.array([[1, 4], [4, 6], [2, 3], [5, 6]]))
    assert labels.tolist() == [0, 1, 2, 2, 1, 1, 1]
    assert connected_components(3, np.zeros((0, 2), dtype=np.int64)).tolist() == [0, 1, 2]


def test_documents_without_shingles_are_not_clustered():
    result = run(["", "", ENGLISH])
    assert result.verdict.tolist() == [KEEP, EXACT, KEEP]


@pytest.mark.parametrize("bands,rows", [(14, 8), (20, 5)])
def test_band_configuration_is_respected(bands, rows):
    hasher = MinHasher(bands * rows, ngram=5, seed=1)
    a, b = ENGLISH, ENGLISH.replace("castle", "fortress")
    signatures = np.stack([hasher.signature(a), hasher.signature(b)])
    result = deduplicate(signatures, np.array([1, 2], dtype=np.uint64), exact=True, near=True, bands=bands, rows=rows,
                         threshold=0.7)
    assert result.verdict.tolist() == [KEEP, NEAR]
