"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from echoembed.errors import InputError
from echoembed.validation import paired_cosine, rankdata, read_sts, spearman
from tests.helpers import STSB_DEV


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


def test_ndcg_at_k_hand_computed():
    from echoembed.validation import ndcg_at_k

    rel = {"a": 1, "b": 2}
    # ranked c, b, a: DCG = 0 + 2/log2(3) + 1/log2(4) = 1.26186 + 0.5; IDCG = 2 + 1/log2(3)
    want = (2 / np.log2(3) + 0.5) / (2 + 1 / np.log2(3))
    assert ndcg_at_k(["c", "b", "a"], rel, k=10) == pytest.approx(want)
    assert ndcg_at_k(["b", "a", "c"], rel, k=10) == pytest.approx(1.0)
    assert ndcg_at_k(["c", "b", "a"], rel, k=1) == 0.0  # nothing relevant at rank 1
    assert ndcg_at_k(["x"], {}, k=10) == 0.0
    with pytest.raises(InputError, match="k must be"):
        ndcg_at_k(["a"], rel, k=0)


def test_recall_at_k_and_accuracy_hand_computed():
    from echoembed.validation import accuracy, recall_at_k

    rel = {"a": 1, "b": 1, "c": 0, "d": 2}
    assert recall_at_k(["a", "x", "c", "d"], rel, k=2) == pytest.approx(1 / 3)
    assert recall_at_k(["a", "x", "c", "d"], rel, k=100) == pytest.approx(2 / 3)
    assert recall_at_k(["a"], {"a": 0}, k=1) == 0.0
    assert accuracy([1, 2, 3, 3], [1, 2, 0, 3]) == pytest.approx(0.75)
    with pytest.raises(InputError, match="equal length"):
        accuracy([1], [1, 2])
