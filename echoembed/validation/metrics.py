"""Metrics in numpy (no scipy): rank correlation, cosine similarity, retrieval and
classification metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from echoembed.errors import InputError


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get the average of their ranks (like scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise InputError(
            f"spearman needs two 1-D arrays of equal length >= 2, got {a.shape}, {b.shape}"
        )
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    if denom == 0:
        raise InputError("spearman is undefined when one side is constant")
    return float((ra * rb).sum() / denom)


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, d] arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"paired_cosine needs equal shapes, got {a.shape} and {b.shape}")
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def ndcg_at_k(ranked: Sequence[str], relevance: Mapping[str, float], k: int = 10) -> float:
    """nDCG@k of one ranked list (BEIR / trec_eval ``ndcg_cut``: gain = graded relevance,
    discount 1/log2(rank + 1)); ideal from the judged relevances. 0 when nothing is relevant."""
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    gains = [float(relevance.get(doc, 0.0)) for doc in ranked[:k]]
    dcg = sum(g / np.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted((float(r) for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
    return float(dcg / idcg) if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevance: Mapping[str, float], k: int = 100) -> float:
    """Share of the relevant documents (relevance > 0) found in the top k. 0 when none exist."""
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    relevant = {doc for doc, r in relevance.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def accuracy(predicted: Sequence, gold: Sequence) -> float:
    """Share of positions where ``predicted`` equals ``gold``."""
    if len(predicted) != len(gold) or not gold:
        raise InputError(
            f"accuracy needs two non-empty sequences of equal length, got {len(predicted)} "
            f"and {len(gold)}"
        )
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
