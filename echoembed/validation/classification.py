"""Classification on embeddings (Banking77 layout: ``text TAB label``, header, no quoting).

Only a test split is shipped, so the evaluation splits it: for each of ``splits`` seeded draws,
``train_per_label`` examples of every label train a classifier on the frozen embeddings and the
rest of that label are predicted; the mean accuracy over draws is reported. The classifier is a
multinomial logistic regression (numpy, standardized features, L2, full-batch Adam) or cosine
kNN. These numbers compare embeddings with each other; they are not MTEB's Banking77 figures
(MTEB trains on the separate train split).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from echoembed.errors import InputError
from echoembed.validation.metrics import accuracy


@dataclass(frozen=True)
class ClassificationConfig:
    limit: int | None = None  # about this many examples: limit // labels (>= 2) per label
    train_per_label: int = 20
    splits: int = 5
    seed: int = 0
    classifier: Literal["logreg", "knn"] = "logreg"
    knn_k: int = 5
    l2: float = 1e-3  # logreg weight decay on standardized features
    steps: int = 300  # logreg full-batch Adam steps

    def describe(self, train_per_label: int | None = None) -> str:
        n = self.train_per_label if train_per_label is None else train_per_label
        what = f"logistic regression (L2 {self.l2})" if self.classifier == "logreg" else (
            f"cosine {self.knn_k}-NN"
        )  # fmt: skip
        return (
            f"{what}, {n} train examples per label, the rest test, mean of "
            f"{self.splits} seeded splits (seed {self.seed})"
        )


@dataclass(frozen=True)
class ClassificationData:
    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def read_classification(
    path: str | os.PathLike[str], config: ClassificationConfig | None = None
) -> ClassificationData:
    """Read ``text TAB label`` rows; with ``config.limit``, a seeded per-label subsample."""
    config = config or ClassificationConfig()
    p = Path(path)
    if not p.is_file():
        raise InputError(
            f"classification file {p} does not exist (expected e.g. "
            "../shared/data/banking77/test.tsv)"
        )
    texts: list[str] = []
    labels: list[str] = []
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["text", "label"]:
            raise InputError(f"{p}: expected a header 'text<TAB>label', got {header}")
        for lineno, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise InputError(f"{p}:{lineno}: expected 2 tab-separated fields, got {len(row)}")
            if not row[0].strip():
                raise InputError(f"{p}:{lineno}: empty text")
            texts.append(row[0])
            labels.append(row[1])
    by_label = _by_label(labels)
    if len(by_label) < 2 or min(len(v) for v in by_label.values()) < 2:
        raise InputError(f"{p}: needs >= 2 labels with >= 2 examples each")
    if config.limit is not None:
        # at least 2 per label (one to train, one to test), so a small limit still runs
        per_label = max(2, config.limit // len(by_label))
        rng = np.random.default_rng(config.seed)
        keep = sorted(
            i
            for lab in sorted(by_label)
            for i in rng.permutation(by_label[lab])[:per_label].tolist()
        )
        texts = [texts[i] for i in keep]
        labels = [labels[i] for i in keep]
    return ClassificationData(p.parent.name or p.stem, tuple(texts), tuple(labels))


def _by_label(labels: Sequence[str]) -> dict[str, list[int]]:
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    return by_label


def train_per_label(labels: Sequence[str], config: ClassificationConfig) -> int:
    """``config.train_per_label``, lowered to half the smallest label's count when that is less
    (a ``--limit`` subsample): every label keeps test examples."""
    smallest = min(len(v) for v in _by_label(labels).values())
    return max(1, min(config.train_per_label, smallest // 2))


def _splits(labels: Sequence[str], config: ClassificationConfig):
    by_label = _by_label(labels)
    n_train = train_per_label(labels, config)
    rng = np.random.default_rng(config.seed)
    for _ in range(config.splits):
        train, test = [], []
        for lab in sorted(by_label):
            idx = rng.permutation(by_label[lab])
            train.extend(idx[:n_train].tolist())
            test.extend(idx[n_train:].tolist())
        yield np.array(sorted(train)), np.array(sorted(test))


def fit_logreg(
    x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-3, steps: int = 300
) -> Callable[[np.ndarray], np.ndarray]:
    """Multinomial logistic regression; returns predict(x) -> class indices."""
    mu = x.mean(axis=0)
    sd = x.std(axis=0) + 1e-6
    z = (x - mu) / sd
    n, d = z.shape
    w = np.zeros((d, n_classes))
    b = np.zeros(n_classes)
    onehot = np.eye(n_classes)[y]
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    lr, b1, b2 = 0.05, 0.9, 0.999
    for t in range(1, steps + 1):
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / n
        grads = [z.T @ g + l2 * w, g.sum(axis=0)]
        for i, (param, grad) in enumerate(zip((w, b), grads, strict=True)):
            m[i] = b1 * m[i] + (1 - b1) * grad
            v[i] = b2 * v[i] + (1 - b2) * grad * grad
            param -= lr * (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + 1e-8)

    def predict(xq: np.ndarray) -> np.ndarray:
        return np.argmax(((xq - mu) / sd) @ w + b, axis=1)

    return predict


def knn_predict(
    train: np.ndarray, y: np.ndarray, query: np.ndarray, n_classes: int, k: int = 5
) -> np.ndarray:
    """Cosine kNN, votes weighted by similarity (ties: the lower class index)."""

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sims = unit(query) @ unit(train).T
    k = min(k, len(train))
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(query), n_classes))
    rows = np.arange(len(query))
    for j in range(k):
        np.add.at(votes, (rows, y[top[:, j]]), sims[rows, top[:, j]])
    return np.argmax(votes, axis=1)


def classification_accuracy(
    embeddings: np.ndarray, labels: Sequence[str], config: ClassificationConfig | None = None
) -> float:
    """Mean accuracy (x100) over the seeded splits."""
    config = config or ClassificationConfig()
    names = sorted(set(labels))
    y = np.array([names.index(lab) for lab in labels])
    x = np.asarray(embeddings, dtype=np.float64)
    if len(x) != len(y):
        raise InputError(f"{len(x)} embeddings for {len(y)} labels")
    scores = []
    for tr, te in _splits(labels, config):
        if config.classifier == "logreg":
            pred = fit_logreg(x[tr], y[tr], len(names), config.l2, config.steps)(x[te])
        elif config.classifier == "knn":
            pred = knn_predict(x[tr], y[tr], x[te], len(names), config.knn_k)
        else:
            raise InputError(f"classifier must be 'logreg' or 'knn', got {config.classifier!r}")
        scores.append(accuracy(pred.tolist(), y[te].tolist()))
    return 100.0 * float(np.mean(scores))


def evaluate_classification(
    data: ClassificationData,
    embed: Callable[[Sequence[str]], np.ndarray],
    config: ClassificationConfig | None = None,
) -> float:
    return classification_accuracy(embed(list(data.texts)), data.labels, config)
