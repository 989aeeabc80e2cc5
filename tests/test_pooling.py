"""Pooling semantics (numpy), with padding, against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from echoembed.echo import Pooling, l2_normalize, pool
from echoembed.errors import InputError


@pytest.fixture()
def hidden():
    # batch 2, seq 4, dim 2; row 1 is right-padded after position 2
    h = np.array(
        [
            [[1, 0], [2, 2], [3, 4], [5, 6]],
            [[7, 1], [8, 3], [9, 5], [100, 100]],
        ],
        dtype=np.float32,
    )
    mask = np.array([[0, 1, 1, 1], [1, 0, 1, 0]], dtype=np.int64)
    return h, mask


def test_mean_pooling_ignores_unpooled_and_padding(hidden):
    h, mask = hidden
    out = pool(h, mask, "mean")
    np.testing.assert_allclose(out, [[10 / 3, 4.0], [8.0, 3.0]])


def test_last_pooling_takes_last_pooled_position(hidden):
    h, mask = hidden
    out = pool(h, mask, Pooling.LAST)
    np.testing.assert_allclose(out, [[5, 6], [9, 5]])


def test_empty_span_pools_to_zero(hidden):
    h, _ = hidden
    mask = np.zeros((2, 4), dtype=np.int64)
    for mode in ("mean", "last"):
        assert not pool(h, mask, mode).any()


def test_l2_normalize():
    x = np.array([[3, 4], [0, 0]], dtype=np.float32)
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0, 0]])


def test_bad_pooling_and_shapes(hidden):
    h, mask = hidden
    with pytest.raises(InputError, match="unknown pooling 'max'"):
        pool(h, mask, "max")
    with pytest.raises(InputError, match="pool_mask"):
        pool(h, mask[:, :3], "mean")
