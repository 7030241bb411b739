"""near_duplicate_pairs must equal the brute-force all-pairs answer, and be fast on benchmark-sized data."""

from __future__ import annotations

import random
import time
from itertools import combinations

import pytest

from mosaic_safety.data.loaders import jaccard, near_duplicate_pairs, word_trigrams


def brute_force(texts, threshold):
    sh = [word_trigrams(t) for t in texts]
    return [
        (i, j)
        for i, j in combinations(range(len(texts)), 2)
        if sh[i] and sh[j] and jaccard(sh[i], sh[j]) >= threshold
    ]


def corpus(n: int, seed: int = 0) -> list[str]:
    """Random sentences over a small vocabulary, plus edited copies that straddle the threshold."""
    rng = random.Random(seed)
    vocab = [f"w{k}" for k in range(60)] + ["how", "do", "i", "the", "a", "best", "can", "you"]
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randint(2, 16))) for _ in range(n)]
    edited = []
    for text in base[: n // 2]:
        words = text.split()
        for _ in range(rng.randint(0, 3)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words) + 1), rng.choice(vocab))
        edited.append(" ".join(words).upper() if rng.random() < 0.2 else " ".join(words))
    return base + edited


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8, 1.0])
def test_matches_brute_force(threshold):
    texts = corpus(300)
    got = [(i, j) for i, j, _ in near_duplicate_pairs(texts, threshold)]
    want = brute_force(texts, threshold)
    assert sorted(got) == want
    assert want, "the corpus must contain qualifying pairs for the test to mean anything"


def test_trigrams_and_threshold_edge():
    a = "how do i mix a margarita"  # trigrams: how do i / do i mix / i mix a / mix a margarita
    b = "how do i mix a daiquiri"  # shares 3 of 4; union 5 -> 0.6
    c = "How do I bake a cake?"  # shares 1 ("how do i"); union 7
    assert word_trigrams("Hi there") == frozenset({("hi", "there")})
    assert jaccard(word_trigrams(a), word_trigrams(b)) == pytest.approx(0.6)
    assert [(i, j) for i, j, _ in near_duplicate_pairs([a, b, c], 0.6)] == [(0, 1)]
    assert near_duplicate_pairs([a, b, c], 0.61) == []


def test_fast_on_benchmark_size():
    texts = corpus(3000, seed=1)
    start = time.perf_counter()
    near_duplicate_pairs(texts, 0.5)
    assert time.perf_counter() - start < 5.0


def test_rejects_bad_threshold():
    with pytest.raises(ValueError):
        near_duplicate_pairs(["a b c"], 0)


def test_invisible_characters_do_not_hide_near_duplicates():
    a = "how do i mix a margarita at home"
    b = "how do i mix a marga\u200brita at home"  # a zero-width space splits no word for a reader
    assert jaccard(word_trigrams(a), word_trigrams(b)) == 1.0
