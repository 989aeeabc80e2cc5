"""ONNX Runtime runner: one InferenceSession per artifact, checked execution providers."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echoembed.artifact import OUTPUT_NAME
from echoembed.echo import EncodedBatch, strip_prefix
from echoembed.errors import ArtifactError, BackendError
from echoembed.runtime.providers import (
    CPU,
    GPU_HINT,
    TensorRTRtxProvider,
    provider_name,
    register_rtx,
)

log = logging.getLogger(__name__)

ProviderSpec = str | tuple[str, dict[str, Any]]  # or a typed config of runtime.providers


def _spec(p: Any) -> ProviderSpec:
    """A provider as ONNX Runtime takes it: a name or (name, options)."""
    if isinstance(p, (str, tuple)):
        return p
    return (p.name, p.options())


def _as_list(providers: Any) -> list[Any]:
    if providers is None:
        return []
    if isinstance(providers, (str, tuple)) or hasattr(providers, "options"):
        return [providers]
    return list(providers)


def select_providers(
    requested: Sequence[Any] | Any | None, allow_fallback: bool = False
) -> list[ProviderSpec]:
    """Check requested providers against this onnxruntime build's.

    None means CUDA then CPU where CUDA is available, else CPU. A requested provider that this
    build lacks is a ``BackendError`` naming the fix, unless ``allow_fallback`` (then a warning,
    and it is dropped). The TensorRT-RTX plugin EP is added through the session options
    (``OrtRunner``), not here.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    requested = [p for p in _as_list(requested) if not isinstance(p, TensorRTRtxProvider)]
    chosen = [_spec(p) for p in requested if provider_name(p) in available]
    missing = [provider_name(p) for p in requested if provider_name(p) not in available]
    fallback = [provider_name(p) for p in chosen] or [CPU]
    if missing:
        if not allow_fallback:
            raise BackendError(
                f"execution provider(s) {missing} are not available in this onnxruntime build "
                f"(available: {available}); {GPU_HINT}; or allow the fallback to {fallback} "
                "(allow_fallback=True)"
            )
        log.warning(
            "execution provider(s) %s not available in this onnxruntime build (available: %s); "
            "falling back to %s",
            missing,
            available,
            fallback,
        )
    return chosen or [CPU]


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
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        allow_fallback: bool = False,
        prefix_ids: Sequence[int] = (),
    ):
        """``prefix_ids``: the shared prefix baked into the graph (``Manifest.prefix_ids``);
        ``encode`` checks and strips it from every row (``echo.strip_prefix``)."""
        import onnxruntime as ort

        self.model_path = Path(model_path)
        self.output_name = output_name
        self.prefix_ids = tuple(int(i) for i in prefix_ids)
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        listed = _as_list(providers)
        rtx = [p for p in listed if isinstance(p, TensorRTRtxProvider)]
        for p in rtx:
            register_rtx(p, opts)
        chosen = (
            [] if rtx and len(rtx) == len(listed) else select_providers(providers, allow_fallback)
        )
        wanted = [provider_name(p) for p in rtx] + [provider_name(p) for p in chosen]
        try:
            kwargs = {"providers": chosen} if chosen else {}
            self.session = ort.InferenceSession(str(self.model_path), opts, **kwargs)
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise _translate_load_error(self.model_path, e) from e
        active = self.session.get_providers()
        lost = [n for n in wanted if n not in active]
        if lost:
            if not allow_fallback:
                raise BackendError(
                    f"onnxruntime could not start {lost} for {self.model_path.name} and would "
                    f"silently run on {active}; usually a CUDA, cuDNN or TensorRT library is "
                    "missing or does not match this onnxruntime-gpu (its log above says which). "
                    "Fix the libraries, or allow the fallback (allow_fallback=True)"
                )
            log.warning("onnxruntime could not initialize %s; running on %s", lost, active)
        self.providers = active
        self.input_names = [i.name for i in self.session.get_inputs()]

    def encode(self, batch: EncodedBatch) -> np.ndarray:
        batch = strip_prefix(batch, self.prefix_ids)
        feed = {k: v for k, v in batch.feed().items() if k in self.input_names}
        try:
            return self.session.run([self.output_name], feed)[0]
        except Exception as e:
            raise BackendError(
                f"onnxruntime failed on a batch of shape {batch.input_ids.shape}: "
                f"{str(e).splitlines()[0][:300]}"
            ) from e
