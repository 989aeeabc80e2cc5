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


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None
) -> list[list[int]]:
    """Row indices per batch, longest rows first (sorting cuts padding).

    A batch closes at ``batch_size`` rows, or (with ``max_batch_tokens``, as
    text-embeddings-inference batches) when one more row would make its padded size, rows x its
    longest row, exceed the budget; a row longer than the budget runs alone. Every index appears
    exactly once; without a budget this is fixed-size chunks of the length-sorted rows.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_batch_tokens is not None and (
        not isinstance(max_batch_tokens, int) or max_batch_tokens < 1
    ):
        raise InputError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (
            len(current) >= batch_size
            or (
                max_batch_tokens is not None
                and (len(current) + 1) * lengths[current[0]] > max_batch_tokens
            )
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The share of the batches' tokens that are padding (each batch padded to its longest)."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 0.0 if padded == 0 else 1.0 - sum(lengths[i] for b in batches for i in b) / padded


def embed_texts(
    runner: Runner,
    encoder: EchoEncoder,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    normalize: bool = True,
    variables: Mapping[str, str] | None = None,
    show_progress: bool | None = None,
    max_batch_tokens: int | None = None,
) -> np.ndarray:
    """Encode texts with ``encoder``, run them through ``runner`` in length-sorted batches.

    Rows come back in input order; sorting by token length cuts padding. ``max_batch_tokens``
    also caps each batch's padded size (``plan_batches``). ``show_progress=None`` shows a bar
    only for more than one batch on a terminal.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    rows = encoder.encode_ids(texts, variables)
    chunks = plan_batches([len(r.ids) for r in rows], batch_size, max_batch_tokens)
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
