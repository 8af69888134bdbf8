"""Area under the ROC curve, the one implementation the probe report and the embedded guard use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def checked_scores_labels(scores: Sequence[float] | np.ndarray,
                          labels: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores as finite float64 and labels as booleans, one of each per example; ValueError
    on mismatched lengths, labels other than 0/1, or NaN/inf scores."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1 or False/True (benign/harmful)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return scores, labels.astype(bool)


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """AUROC from ranks (Mann-Whitney U); tied scores share their mean rank.

    Equals the probability that a random positive scores above a random negative, ties
    counting one half. `labels` are booleans or 0/1; scores must be finite. Raises ValueError
    on mismatched lengths, other labels, NaN/inf scores, or a missing class.
    """
    scores, labels = checked_scores_labels(scores, labels)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positive, {n_neg} negative")
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(ordered)]
    mean_rank = (starts + ends + 1) / 2.0  # 1-based ranks start+1..end, averaged
    ranks = np.empty(len(scores))
    ranks[order] = mean_rank[group]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
