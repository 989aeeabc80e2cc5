"""STS data (sentence1 TAB sentence2 TAB score, header line, no quoting) and STS evaluation."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.errors import InputError
from echoembed.validation.metrics import paired_cosine, spearman


@dataclass(frozen=True)
class StsData:
    sentence1: tuple[str, ...]
    sentence2: tuple[str, ...]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def unique_sentences(self) -> list[str]:
        return list(dict.fromkeys(self.sentence1 + self.sentence2))


def read_sts(path: str | os.PathLike[str], limit: int | None = None) -> StsData:
    """Read an STS TSV file (as in ../shared/data/stsb) with quoting off."""
    p = Path(path)
    if not p.is_file():
        raise InputError(
            f"STS file {p} does not exist (expected e.g. ../shared/data/stsb/test.tsv)"
        )
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:3]] != [
            "sentence1",
            "sentence2",
            "score",
        ]:
            raise InputError(
                f"{p}: expected a header 'sentence1<TAB>sentence2<TAB>score', got {header}"
            )
        for lineno, row in enumerate(reader, start=2):
            if len(row) != 3:
                raise InputError(f"{p}:{lineno}: expected 3 tab-separated fields, got {len(row)}")
            try:
                scores.append(float(row[2]))
            except ValueError:
                raise InputError(f"{p}:{lineno}: score {row[2]!r} is not a number") from None
            s1.append(row[0])
            s2.append(row[1])
            if limit is not None and len(scores) >= limit:
                break
    if len(scores) < 2:
        raise InputError(f"{p}: needs at least 2 rows to compute a correlation")
    return StsData(tuple(s1), tuple(s2), np.asarray(scores, dtype=np.float64))


def sts_spearman(data: StsData, embed: Callable[[Sequence[str]], np.ndarray]) -> float:
    """Spearman (x100) between gold scores and cosine of the embedded pairs.

    Each unique sentence is embedded once.
    """
    sentences = data.unique_sentences()
    index = {s: i for i, s in enumerate(sentences)}
    emb = embed(sentences)
    a = emb[[index[s] for s in data.sentence1]]
    b = emb[[index[s] for s in data.sentence2]]
    return 100.0 * spearman(paired_cosine(a, b), data.scores)
