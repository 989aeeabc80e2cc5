"""Token-budget batching (``echo.plan_batches``) and the padding it leaves."""

from __future__ import annotations

import numpy as np
import pytest

from echoembed.echo import padding_fraction, plan_batches
from echoembed.errors import InputError
from echoembed.runtime import Embedder
from tests.helpers import SAMPLE_TEXTS


def _check_partition(batches, n):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))


def test_without_a_budget_it_is_fixed_chunks_of_length_sorted_rows():
    lengths = [5, 9, 3, 9, 1, 7, 2]
    batches = plan_batches(lengths, batch_size=3)
    assert batches == [[1, 3, 5], [0, 2, 6], [4]]  # stable sort: ties keep input order
    _check_partition(batches, len(lengths))


def test_the_budget_caps_rows_times_longest_row():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(5, 120, size=200)]
    batches = plan_batches(lengths, batch_size=1000, max_batch_tokens=512)
    _check_partition(batches, len(lengths))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 512
        assert lengths[b[0]] == max(lengths[i] for i in b)  # longest first
    # greedy: every batch but the last would overflow with the next row
    order = [i for b in batches for i in b]
    for k, b in enumerate(batches[:-1]):
        nxt = order[sum(len(x) for x in batches[: k + 1])]
        assert (len(b) + 1) * max(lengths[b[0]], lengths[nxt]) > 512
    assert padding_fraction(lengths, batches) < 0.10


def test_a_row_longer_than_the_budget_runs_alone_and_batch_size_still_caps():
    assert plan_batches([600, 10, 10], batch_size=8, max_batch_tokens=100) == [[0], [1, 2]]
    assert plan_batches([4] * 5, batch_size=2, max_batch_tokens=10_000) == [[0, 1], [2, 3], [4]]


def test_padding_fraction_counts_padded_tokens():
    assert padding_fraction([4, 2], [[0, 1]]) == pytest.approx(1 - 6 / 8)
    assert padding_fraction([4, 2], [[0], [1]]) == 0.0
    assert padding_fraction([], []) == 0.0


@pytest.mark.parametrize("bad", [0, -1, 2.5, "64"])
def test_bad_budgets_are_input_errors(bad):
    with pytest.raises(InputError, match="max_batch_tokens"):
        plan_batches([3, 4], batch_size=2, max_batch_tokens=bad)


def test_budgeted_embeddings_equal_fixed_batches(tiny_artifact):
    emb = Embedder.load(tiny_artifact.path)
    texts = list(SAMPLE_TEXTS) * 3
    fixed = emb.encode(texts, batch_size=4)
    budget = emb.encode(texts, batch_size=64, max_batch_tokens=96)
    assert budget.shape == fixed.shape
    assert float((budget * fixed).sum(axis=1).min()) >= 0.99999
