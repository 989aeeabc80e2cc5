"""Pooling over the pooled span and L2 normalization (numpy).

The semantics every backend mirrors.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from echoembed.errors import InputError


class Pooling(str, Enum):
    """How token states inside the pooled span become one vector."""

    MEAN = "mean"
    LAST = "last"

    @classmethod
    def parse(cls, value: "Pooling | str") -> "Pooling":
        if isinstance(value, Pooling):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise InputError(
                f"unknown pooling {value!r}; choose one of {[p.value for p in cls]}"
            ) from None


def pool(hidden: np.ndarray, pool_mask: np.ndarray, pooling: Pooling | str) -> np.ndarray:
    """Pool ``hidden`` [batch, seq, dim] over ``pool_mask`` [batch, seq] -> [batch, dim] float32.

    mean: average of the states where pool_mask == 1. last: the state at the last position where
    pool_mask == 1, found as max(position * mask) (no ArgMax, so graphs can mirror it exactly).
    A row with an empty span pools to zeros.
    """
    mode = Pooling.parse(pooling)
    if hidden.ndim != 3 or pool_mask.shape != hidden.shape[:2]:
        raise InputError(
            f"pool() needs hidden [batch, seq, dim] and pool_mask [batch, seq]; got "
            f"{hidden.shape} and {pool_mask.shape}"
        )
    hidden = hidden.astype(np.float32, copy=False)
    mask = (pool_mask > 0).astype(np.float32)
    if mode is Pooling.MEAN:
        summed = np.einsum("bsd,bs->bd", hidden, mask)
        count = np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        return (summed / count).astype(np.float32)
    positions = np.arange(hidden.shape[1], dtype=np.int64)
    last = (positions[None, :] * (pool_mask > 0)).max(axis=1)
    out = hidden[np.arange(hidden.shape[0]), last]
    out[mask.sum(axis=1) == 0] = 0.0
    return out.astype(np.float32)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each row to unit L2 norm (rows of zeros stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)
