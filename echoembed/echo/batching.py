"""The runner interface shared by every backend, and text -> embedding batching on top of it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from echoembed.echo.encode import EchoEncoder
from echoembed.echo.pooling import l2_normalize
from echoembed.errors import InputError, InternalError


@runtime_checkable
class Runner(Protocol):
    """A backend (PyTorch reference, ONNX Runtime, TensorRT): pooled embeddings for a batch."""

    def encode(self, batch) -> np.ndarray:  # EncodedBatch -> float32 [batch, hidden]
        ...


def embed_texts(
    runner: Runner,
    encoder: EchoEncoder,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    normalize: bool = True,
    variables: Mapping[str, str] | None = None,
    show_progress: bool | None = None,
) -> np.ndarray:
    """Encode texts with ``encoder``, run them through ``runner`` in length-sorted batches.

    Rows come back in input order; sorting by token length cuts padding. ``show_progress=None``
    shows a bar only for more than one batch on a terminal.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    rows = encoder.encode_ids(texts, variables)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: np.ndarray | None = None
    from tqdm.auto import tqdm

    disable = (len(chunks) <= 1) if show_progress is None else not show_progress
    with tqdm(total=len(rows), desc="embedding", unit="text", disable=disable, leave=False) as bar:
        for chunk in chunks:
            batch = encoder.pad([rows[i] for i in chunk])
            emb = np.asarray(runner.encode(batch), dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != len(chunk):
                raise InternalError(
                    f"runner {type(runner).__name__} returned shape {emb.shape} for a batch of "
                    f"{len(chunk)}"
                )
            if out is None:
                out = np.empty((len(rows), emb.shape[1]), dtype=np.float32)
            out[chunk] = emb
            bar.update(len(chunk))
    if out is None:
        raise InputError("nothing to encode: texts is empty")
    return l2_normalize(out) if normalize else out
