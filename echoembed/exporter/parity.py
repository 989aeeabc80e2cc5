"""Export-time parity: ONNX Runtime vs the PyTorch reference on texts of different lengths,
at several batch sizes. Every failure is collected, then one ParityError lists them all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from echoembed.artifact import OUTPUT_NAME, ParityReport
from echoembed.data import PARITY_TEXTS
from echoembed.echo import EchoEncoder, Pooling, l2_normalize
from echoembed.errors import ParityError

if TYPE_CHECKING:
    from echoembed.reference.sources import LoadedModel

DEFAULT_PARITY_TEXTS = PARITY_TEXTS  # the name this module exported before echoembed.data


@dataclass(frozen=True)
class ParityConfig:
    batch_sizes: tuple[int, ...] = (1, 3, 8)
    texts: tuple[str, ...] = PARITY_TEXTS
    tolerance: float | None = None  # max abs diff of normalized embeddings; None: per architecture


def check_parity(
    loaded: LoadedModel,
    encoder: EchoEncoder,
    model_path: Path,
    config: ParityConfig,
    *,
    pooling: Pooling | str,
    tolerance: float,
    threads: int | None = None,
    prefix_ids: tuple[int, ...] = (),
) -> ParityReport:
    """Compare the ONNX graph at ``model_path`` with the reference; raise ParityError if over.
    ``prefix_ids``: the graph's baked shared prefix (it takes prompts without it; the reference
    computes whole prompts)."""
    from echoembed.reference import TorchRunner
    from echoembed.runtime.ort import OrtRunner

    texts = list(config.texts)
    ref = TorchRunner(loaded.model, Pooling.parse(pooling))
    ort = OrtRunner(model_path, OUTPUT_NAME, providers=["CPUExecutionProvider"], threads=threads,
                    prefix_ids=prefix_ids)  # fmt: skip
    worst_diff, worst_cos, failures = 0.0, 1.0, []
    for bs in config.batch_sizes:
        for start in range(0, len(texts), bs):
            batch = encoder.encode(texts[start : start + bs])
            want = l2_normalize(ref.encode(batch))
            got = l2_normalize(ort.encode(batch))
            diff = float(np.abs(want - got).max())
            cos = float((want * got).sum(axis=1).min())
            worst_diff, worst_cos = max(worst_diff, diff), min(worst_cos, cos)
            if not np.isfinite(got).all() or diff > tolerance:
                failures.append(
                    f"batch size {bs}, texts {start}..{start + len(batch) - 1} "
                    f"(seq {batch.input_ids.shape[1]}): max abs diff {diff:.2e}, "
                    f"min cosine {cos:.6f}"
                )
    if failures:
        raise ParityError(
            f"the exported graph disagrees with the PyTorch reference (tolerance {tolerance:.1e} "
            "max abs diff on normalized embeddings); no artifact was written:\n  "
            + "\n  ".join(failures)
        )
    return ParityReport(
        reference="pytorch-fp32",
        max_abs_diff=worst_diff,
        min_cosine=worst_cos,
        tolerance=tolerance,
        batch_sizes=tuple(config.batch_sizes),
        num_texts=len(texts),
        passed=True,
    )
