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
    block: int = 8,
) -> dict[str, Latency]:
    """Batch-1 latency: each text embedded alone by every candidate; median over the texts.

    The candidates take turns in blocks of ``block`` texts (their order alternating per block),
    each block after one untimed call: a runtime's threads keep spinning for a while after a
    call (ONNX Runtime's pool, OpenMP), and turns per text would time each candidate against
    the previous one's spinning threads (on 2 cores that inflated latencies 1.6-1.8x). Turns
    per block still spread a drifting machine load over all candidates.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    names = list(candidates)
    for t in list(texts[:warmup]):
        for n in names:
            candidates[n]([t])
    times: dict[str, list[float]] = {n: [] for n in names}
    for b, start in enumerate(range(0, len(texts), block)):
        chunk = texts[start : start + block]
        for n in names if b % 2 == 0 else names[::-1]:
            candidates[n]([chunk[0]])  # untimed: the previous candidate's threads go idle
            for t in chunk:
                t0 = time.perf_counter()
                candidates[n]([t])
                times[n].append(time.perf_counter() - t0)
    return {n: Latency(n, tuple(times[n])) for n in names}
