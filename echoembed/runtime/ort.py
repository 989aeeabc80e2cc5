"""ONNX Runtime runner: one InferenceSession per artifact, checked execution providers."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echoembed.artifact import OUTPUT_NAME
from echoembed.echo import EncodedBatch
from echoembed.errors import ArtifactError, BackendError

log = logging.getLogger(__name__)

ProviderSpec = str | tuple[str, dict[str, Any]]


def _name(p: ProviderSpec) -> str:
    return p if isinstance(p, str) else p[0]


def select_providers(requested: Sequence[ProviderSpec] | None) -> list[ProviderSpec]:
    """Check requested providers against the available ones; warn and drop the missing ones.

    None means CUDA then CPU where CUDA is available, else CPU.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        requested = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        return list(requested)
    if isinstance(requested, str):
        requested = [requested]
    chosen = [p for p in requested if _name(p) in available]
    missing = [_name(p) for p in requested if _name(p) not in available]
    if missing:
        log.warning(
            "execution provider(s) %s not available in this onnxruntime build (available: %s); "
            "falling back to %s",
            missing,
            available,
            [_name(p) for p in chosen] or ["CPUExecutionProvider"],
        )
    if not chosen:
        chosen = ["CPUExecutionProvider"]
    return chosen


def _translate_load_error(path: Path, e: Exception) -> Exception:
    msg = str(e)
    if "Protobuf parsing failed" in msg or "INVALID_PROTOBUF" in msg or "InvalidProtobuf" in msg:
        return ArtifactError(
            f"{path.name} is not a readable ONNX model (truncated or corrupt file?); re-export "
            f"the artifact or copy it again ({msg.splitlines()[0][:200]})"
        )
    if "external data" in msg.lower() or "model_path must not be empty" in msg:
        return ArtifactError(
            f"{path.name} refers to external weight data that cannot be read: keep the data file "
            f"next to it ({msg.splitlines()[0][:200]})"
        )
    if "opset" in msg.lower() and "support" in msg.lower():
        return BackendError(
            f"this onnxruntime cannot run {path.name}: {msg.splitlines()[0][:200]}; upgrade "
            "onnxruntime or re-export with a lower --opset"
        )
    return BackendError(f"onnxruntime failed to load {path}: {msg.splitlines()[0][:300]}")


class OrtRunner:
    """Runner over an ONNX Runtime session whose graph outputs the pooled embedding."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        output_name: str = OUTPUT_NAME,
        providers: Sequence[ProviderSpec] | None = None,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        self.model_path = Path(model_path)
        self.output_name = output_name
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        chosen = select_providers(providers)
        try:
            self.session = ort.InferenceSession(str(self.model_path), opts, providers=chosen)
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise _translate_load_error(self.model_path, e) from e
        active = self.session.get_providers()
        lost = [_name(p) for p in chosen if _name(p) not in active]
        if lost:
            log.warning("onnxruntime could not initialize %s; running on %s", lost, active)
        self.providers = active
        self.input_names = [i.name for i in self.session.get_inputs()]

    def encode(self, batch: EncodedBatch) -> np.ndarray:
        feed = {k: v for k, v in batch.feed().items() if k in self.input_names}
        try:
            return self.session.run([self.output_name], feed)[0]
        except Exception as e:
            raise BackendError(
                f"onnxruntime failed on a batch of shape {batch.input_ids.shape}: "
                f"{str(e).splitlines()[0][:300]}"
            ) from e
