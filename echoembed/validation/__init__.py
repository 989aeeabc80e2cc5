"""Validation: metrics and task evaluations (numpy; a reference model only when asked)."""

from __future__ import annotations

from echoembed.validation.metrics import (
    accuracy,
    ndcg_at_k,
    paired_cosine,
    rankdata,
    recall_at_k,
    spearman,
)
from echoembed.validation.report import MachineInfo
from echoembed.validation.sts import StsData, read_sts, sts_spearman
from echoembed.validation.timing import Throughput, compare_throughput

__all__ = [
    "MachineInfo",
    "StsData",
    "Throughput",
    "accuracy",
    "compare_throughput",
    "ndcg_at_k",
    "paired_cosine",
    "rankdata",
    "read_sts",
    "recall_at_k",
    "spearman",
    "sts_spearman",
]
