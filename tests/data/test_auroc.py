"""AUROC: the one implementation the probe report and the embedded guard's measures use."""

from __future__ import annotations

import numpy as np
import pytest

from safekeel.data.auroc import auroc


def pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Brute force: share of (positive, negative) pairs ordered right, ties counting 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=60).astype(float)  # many ties
    labels = rng.integers(0, 2, size=60)
    assert auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_hand_cases():
    labels = np.array([0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert auroc(np.array([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert auroc(np.array([0.1, 0.3, 0.2, 0.4]), labels) == 0.75
    # plain lists of booleans, as the embedded default's guard measure passes them
    assert auroc([0.9, 0.1, 0.4], [True, False, False]) == 1.0


@pytest.mark.parametrize(
    ("scores", "labels", "problem"),
    [
        ([0.1, 0.2], [1, 1], "both classes"),
        ([0.1, 0.2], [1, 2], "labels must be"),
        ([0.1, float("nan")], [0, 1], "NaN"),
        ([0.1, 0.2, 0.3], [0, 1], "3 scores but 2 labels"),
    ],
)
def test_auroc_refuses_what_has_no_auroc(scores, labels, problem):
    with pytest.raises(ValueError, match=problem):
        auroc(scores, labels)
