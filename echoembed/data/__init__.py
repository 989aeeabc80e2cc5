"""Texts shipped with echoembed: the demo's sentence pairs and the export parity texts.

The one place for them: the demo, the exporter's parity check and the default calibration set
all read from here (``demo_pairs.tsv`` sits beside this module as package data).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

from echoembed.errors import InternalError

__all__ = ["PARITY_TEXTS", "DemoPair", "load_demo_pairs", "shipped_texts"]


@dataclass(frozen=True)
class DemoPair:
    label: str  # "paraphrase" or "unrelated"
    sentence1: str
    sentence2: str


# Texts of very different lengths (a word to a paragraph) for the export parity check.
PARITY_TEXTS: tuple[str, ...] = (
    "Hi.",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Kids play.",
    "Echo embeddings repeat the input so every token of the second copy has seen the whole text.",
    "What is the capital of France?",
    "In 2019, researchers reported that the drug reduced systolic blood pressure by 12 mmHg on "
    "average across 1,204 patients, with few side effects; larger trials are planned for the "
    "coming years in Europe and North America, pending regulatory approval and funding.",
    "ok",
    "A woman slices an onion.",
    "Stocks fell sharply.",
)


def load_demo_pairs() -> list[DemoPair]:
    """The sentence pairs shipped in the package."""
    text = resources.files("echoembed.data").joinpath("demo_pairs.tsv").read_text("utf-8")
    rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    pairs = [DemoPair(*row) for row in rows[1:]]
    if not pairs or {p.label for p in pairs} != {"paraphrase", "unrelated"}:
        raise InternalError("demo_pairs.tsv is damaged: reinstall echoembed")
    return pairs


def shipped_texts() -> list[str]:
    """Every distinct shipped text: both sides of the demo pairs, then the parity texts."""
    pairs = load_demo_pairs()
    texts = [p.sentence1 for p in pairs] + [p.sentence2 for p in pairs] + list(PARITY_TEXTS)
    return list(dict.fromkeys(texts))
