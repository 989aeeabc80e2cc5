"""Calibration data: real texts -> the artifact's own template -> fixed-shape batches.

Readers: a text file (one text per line), an STS TSV (both sentence columns), a TSV with a
``text`` column (e.g. Banking77), or a JSONL corpus (``title`` + ``text``, e.g. BEIR SciFact).
Texts are sampled with a seed; the first half calibrates, a disjoint second half measures
accuracy, so the accuracy figure in a manifest is never measured on the calibration texts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.data import shipped_texts
from echoembed.echo import EchoEncoder, EncodedBatch, strip_prefix
from echoembed.errors import InputError


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration texts come from and how many to use."""

    path: str | os.PathLike[str] | None = None  # None: texts shipped with echoembed (small)
    samples: int = 64  # calibration texts; as many again (disjoint) measure accuracy
    seed: int = 0
    batch_size: int = 8
    max_chars: int = 2000  # long corpus documents are cut before templating


@dataclass(frozen=True)
class CalibrationSet:
    source: str
    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for t in self.calibration:
            h.update(t.encode("utf-8") + b"\0")
        return h.hexdigest()


def read_texts_any(path: str | os.PathLike[str]) -> list[str]:
    """Texts from a .txt, .tsv (STS pairs or a ``text`` column) or .jsonl corpus file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        texts = []
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{p}:{lineno}: not JSON ({e})") from None
                text = " ".join(str(doc.get(k, "")).strip() for k in ("title", "text")).strip()
                if text:
                    texts.append(text)
    elif suffix == ".tsv":
        with p.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if not rows:
            raise InputError(f"{p} is empty")
        header = [h.strip().lower() for h in rows[0]]
        if "sentence1" in header and "sentence2" in header:
            cols = [header.index("sentence1"), header.index("sentence2")]
        elif "text" in header:
            cols = [header.index("text")]
        else:
            raise InputError(
                f"{p}: a TSV needs sentence1/sentence2 columns (STS) or a text column; got {header}"
            )
        texts = [row[c] for row in rows[1:] for c in cols if c < len(row)]
    else:
        texts = p.read_text(encoding="utf-8").splitlines()
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    if not texts:
        raise InputError(f"{p} holds no texts")
    return texts


def calibration_source(config: CalibrationConfig) -> str:
    """How a calibration set's origin is named in manifests."""
    return "echoembed shipped texts" if config.path is None else str(config.path)


def load_calibration(config: CalibrationConfig) -> CalibrationSet:
    """Sample disjoint calibration and evaluation texts (seeded)."""
    if config.samples < 1:
        raise InputError(f"samples must be >= 1, got {config.samples}")
    texts = shipped_texts() if config.path is None else read_texts_any(config.path)
    texts = [t[: config.max_chars] for t in texts]
    rng = random.Random(config.seed)
    picked = rng.sample(texts, min(len(texts), 2 * config.samples))
    n_cal = min(config.samples, max(1, len(picked) // 2))
    source = calibration_source(config)
    return CalibrationSet(source, tuple(picked[:n_cal]), tuple(picked[n_cal:]))


def pad_to(batch: EncodedBatch, width: int, pad_id: int) -> EncodedBatch:
    """Right-pad a batch to ``width`` tokens (calibrators need one shape for every batch)."""
    extra = width - batch.input_ids.shape[1]
    if extra < 0:
        raise InputError(f"batch is {batch.input_ids.shape[1]} tokens wide, over {width}")

    def grow(a: np.ndarray, value: int) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, extra)), constant_values=value)

    return EncodedBatch(
        grow(batch.input_ids, pad_id),
        grow(batch.attention_mask, 0),
        grow(batch.pool_mask, 0),
        batch.truncated,
    )


class FixedShapeReader:
    """onnxruntime's CalibrationDataReader protocol: ``get_next() -> feed | None``, ``rewind()``.

    Every batch has the same [batch_size, width] shape (the last one is topped up by repeating
    texts), which the Entropy/Percentile calibrators need.
    """

    def __init__(
        self,
        encoder: EchoEncoder,
        texts: tuple[str, ...] | list[str],
        batch_size: int,
        prefix_ids: tuple[int, ...] = (),
    ):
        """``prefix_ids``: the graph's baked shared prefix, stripped from every batch (the feeds
        are what the graph takes)."""
        if not texts:
            raise InputError("no calibration texts")
        rows = encoder.encode_ids(list(texts))
        self.width = max(len(r.ids) for r in rows)
        self.batches: list[dict[str, np.ndarray]] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            chunk = chunk + rows[: batch_size - len(chunk)] if len(chunk) < batch_size else chunk
            batch = pad_to(encoder.pad(chunk), self.width, encoder.pad_id)
            self.batches.append(strip_prefix(batch, prefix_ids).feed())
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
