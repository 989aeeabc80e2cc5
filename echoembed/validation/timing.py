"""Side-by-side throughput: runs candidates interleaved in one process so noise hits all alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Throughput:
    name: str
    texts: int
    seconds: tuple[float, ...]  # one per repeat

    @property
    def median_seconds(self) -> float:
        return float(np.median(self.seconds))

    @property
    def texts_per_second(self) -> float:
        return self.texts / self.median_seconds


def compare_throughput(
    candidates: dict[str, Callable[[Sequence[str]], object]],
    texts: Sequence[str],
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, Throughput]:
    """Time each candidate on the same texts, round-robin, ``repeats`` times after a warm-up."""
    names = list(candidates)
    for _ in range(warmup):
        for n in names:
            candidates[n](texts[: max(1, min(len(texts), 8))])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            candidates[n](texts)
            times[n].append(time.perf_counter() - t0)
    return {n: Throughput(n, len(texts), tuple(times[n])) for n in names}


@dataclass(frozen=True)
class Latency:
    name: str
    seconds: tuple[float, ...]  # one per text, each embedded alone (batch 1)

    @property
    def median_ms(self) -> float:
        return 1000.0 * float(np.median(self.seconds))


def compare_latency(
    candidates: dict[str, Callable[[Sequence[str]], object]],
    texts: Sequence[str],
    warmup: int = 2,
) -> dict[str, Latency]:
    """Batch-1 latency: each text embedded alone by every candidate in turn (the order
    alternating per text), after ``warmup`` single texts each; median over the texts."""
    names = list(candidates)
    for t in list(texts[:warmup]):
        for n in names:
            candidates[n]([t])
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, t in enumerate(texts):
        for n in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            candidates[n]([t])
            times[n].append(time.perf_counter() - t0)
    return {n: Latency(n, tuple(times[n])) for n in names}
