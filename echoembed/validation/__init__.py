"""Validation: metrics and task evaluations (numpy; a reference model only when asked)."""

from __future__ import annotations

from echoembed.validation.metrics import paired_cosine, rankdata, spearman
from echoembed.validation.sts import StsData, read_sts, sts_spearman
from echoembed.validation.timing import Throughput, compare_throughput

__all__ = [
    "StsData",
    "Throughput",
    "compare_throughput",
    "paired_cosine",
    "rankdata",
    "read_sts",
    "spearman",
    "sts_spearman",
]
