"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from echoembed.errors import InputError
from echoembed.validation import paired_cosine, rankdata, read_sts, spearman
from tests.conftest import STSB_DEV


def test_rankdata_averages_ties():
    assert rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_hand_computed():
    # ranks a: 1 2 3 4 5, ranks b: 2 1 4 3 5 -> d^2 sum = 4 -> 1 - 6*4/(5*24) = 0.8
    assert spearman(np.array([1, 2, 3, 4, 5]), np.array([5, 1, 9, 7, 10])) == pytest.approx(0.8)
    assert spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    # with ties: Pearson on average ranks, a=[1,2,2,3] -> [1,2.5,2.5,4], b ranks [1,2,3,4]
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    expected = np.corrcoef(ra, rb)[0, 1]
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 4])) == pytest.approx(expected)


def test_spearman_rejects_bad_input():
    with pytest.raises(InputError):
        spearman(np.array([1.0]), np.array([1.0]))
    with pytest.raises(InputError, match="constant"):
        spearman(np.array([1, 1, 1]), np.array([1, 2, 3]))


def test_paired_cosine():
    a = np.array([[1, 0], [1, 1]], dtype=np.float32)
    b = np.array([[0, 1], [2, 2]], dtype=np.float32)
    np.testing.assert_allclose(paired_cosine(a, b), [0.0, 1.0], atol=1e-7)


def test_read_sts_real_file():
    data = read_sts(STSB_DEV)
    assert len(data) == 1500
    assert data.sentence1[0] == "A man with a hard hat is dancing."
    assert data.scores[0] == 5.0
    assert 0.0 <= data.scores.min() and data.scores.max() <= 5.0
    assert len(read_sts(STSB_DEV, limit=10)) == 10


def test_read_sts_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_sts(tmp_path / "missing.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\n")
    with pytest.raises(InputError, match="header"):
        read_sts(bad)
    bad.write_text("sentence1\tsentence2\tscore\nx\ty\tnot-a-number\n")
    with pytest.raises(InputError, match="not a number"):
        read_sts(bad)
