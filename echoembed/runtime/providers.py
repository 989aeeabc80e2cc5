"""GPU execution providers for ONNX Runtime: typed options instead of bags of strings.

- ``CudaProvider``: ``CUDAExecutionProvider`` (``pip install 'echoembed[gpu]'``: onnxruntime-gpu,
  which *replaces* the ``onnxruntime`` package; never install both);
- ``TensorRTProvider``: ``TensorrtExecutionProvider`` of onnxruntime-gpu (TensorRT 10 libraries
  on the library path): fp16, engine and timing caches, explicit optimization profiles
  (``echoembed.artifact.engine.Profile``), and optionally an EP-context model (an ONNX file with
  the engine embedded);
- ``TensorRTRtxProvider``: the TensorRT-for-RTX plugin EP (``pip install 'echoembed[rtx]'``:
  consumer RTX GPUs, compute capability 7.5 / 8.6 / 8.9 / 12.0, not Hopper), registered from its
  shared library with ``onnxruntime.register_execution_provider_library`` and added per device
  (``SessionOptions.add_provider_for_devices``).

``OrtRunner`` takes these (or plain provider names) and, unlike ONNX Runtime, refuses to run on
the CPU when a requested GPU provider did not start, unless ``allow_fallback=True``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoembed.artifact.engine import Profile, ort_profile_options
from echoembed.echo import INPUT_NAMES
from echoembed.errors import BackendError, InputError, MissingDependencyError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
TENSORRT_RTX = "NvTensorRTRTXExecutionProvider"
RTX_DISTRIBUTION = "onnxruntime-ep-nv-tensorrt-rtx-cu13"
GPU_HINT = (
    "install onnxruntime-gpu in place of onnxruntime (pip uninstall -y onnxruntime && "
    "pip install 'echoembed[gpu]'), and check that `nvidia-smi` sees a GPU"
)


def _flag(value: bool) -> str:
    return "True" if value else "False"


def _device(device_id: int) -> str:
    if not isinstance(device_id, int) or device_id < 0:
        raise InputError(f"device_id must be a whole number >= 0, got {device_id!r}")
    return str(device_id)


@dataclass(frozen=True)
class CudaProvider:
    """ONNX Runtime's CUDA provider on one GPU."""

    device_id: int = 0

    @property
    def name(self) -> str:
        return CUDA

    def options(self, inputs: Sequence[str] = INPUT_NAMES) -> dict[str, str]:
        return {"device_id": _device(self.device_id)}


@dataclass(frozen=True)
class TensorRTProvider:
    """ONNX Runtime's TensorRT provider (TensorRT 10 under onnxruntime-gpu)."""

    device_id: int = 0
    fp16: bool = False  # let TensorRT run fp32 layers in fp16
    engine_cache_dir: str | None = None  # built engines, reused across sessions
    timing_cache_dir: str | None = None  # kernel timings, speeds up later builds
    profiles: tuple[Profile, ...] = ()  # explicit profiles; () lets the EP build them on demand
    workspace_gb: float | None = None
    ep_context_file: str | None = None  # also write an ONNX file with the engine embedded

    @property
    def name(self) -> str:
        return TENSORRT

    def options(self, inputs: Sequence[str] = INPUT_NAMES) -> dict[str, str]:
        out = {"device_id": _device(self.device_id), "trt_fp16_enable": _flag(self.fp16)}
        if self.engine_cache_dir is not None:
            out["trt_engine_cache_enable"] = "True"
            out["trt_engine_cache_path"] = str(self.engine_cache_dir)
        if self.timing_cache_dir is not None:
            out["trt_timing_cache_enable"] = "True"
            out["trt_timing_cache_path"] = str(self.timing_cache_dir)
        if self.workspace_gb is not None:
            if not self.workspace_gb > 0:
                raise InputError(f"workspace_gb must be > 0, got {self.workspace_gb!r}")
            out["trt_max_workspace_size"] = str(int(self.workspace_gb * (1 << 30)))
        if self.profiles:
            out.update(ort_profile_options(self.profiles, inputs))
        if self.ep_context_file is not None:
            out["trt_dump_ep_context_model"] = "True"
            out["trt_ep_context_file_path"] = str(self.ep_context_file)
        return out


@dataclass(frozen=True)
class TensorRTRtxProvider:
    """The TensorRT-for-RTX plugin execution provider (consumer RTX GPUs)."""

    device_id: int = 0
    library_path: str | None = None  # None: found in the installed plugin wheel
    options_: tuple[tuple[str, str], ...] = ()  # extra EP options, passed as given

    @property
    def name(self) -> str:
        return TENSORRT_RTX

    def options(self, inputs: Sequence[str] = INPUT_NAMES) -> dict[str, str]:
        return {"device_id": _device(self.device_id), **dict(self.options_)}

    def library(self) -> Path:
        """The plugin's shared library: ``library_path``, or the one the wheel installed."""
        if self.library_path is not None:
            path = Path(self.library_path)
            if not path.is_file():
                raise MissingDependencyError(f"TensorRT-RTX plugin library {path} does not exist")
            return path
        from importlib import metadata

        try:
            files = metadata.distribution(RTX_DISTRIBUTION).files or []
        except metadata.PackageNotFoundError:
            files = []
        libs = [f for f in files if "tensorrt_rtx" in f.name.lower() and ".so" in f.name]
        libs += [f for f in files if f.name.lower().endswith(".dll") and "rtx" in f.name.lower()]
        if not libs:
            raise MissingDependencyError(
                f"the TensorRT-RTX plugin EP is not installed; install it with: pip install "
                f"'echoembed[rtx]' (the {RTX_DISTRIBUTION} wheel), or pass library_path"
            )
        return Path(str(libs[0].locate()))


GpuProvider = CudaProvider | TensorRTProvider | TensorRTRtxProvider


def provider_name(p: Any) -> str:
    """The ORT name of a provider given as a name, a (name, options) pair or a typed config."""
    if isinstance(p, str):
        return p
    if isinstance(p, tuple):
        return str(p[0])
    return str(p.name)


def register_rtx(provider: TensorRTRtxProvider, session_options: Any) -> None:
    """Register the plugin library once and add it for its device to ``session_options``."""
    import onnxruntime as ort

    if not any(d.ep_name == TENSORRT_RTX for d in ort.get_ep_devices()):
        library = os.fspath(provider.library())  # MissingDependencyError: not installed
        try:
            ort.register_execution_provider_library(TENSORRT_RTX, library)
        except Exception as e:  # e.g. libcuda.so.1 missing on a machine without a driver
            raise BackendError(
                f"the TensorRT-RTX plugin EP could not be registered: {str(e).splitlines()[0]}; "
                "it needs an NVIDIA driver and a supported RTX GPU"
            ) from e
    devices = [d for d in ort.get_ep_devices() if d.ep_name == TENSORRT_RTX]
    if len(devices) <= provider.device_id:
        raise BackendError(
            f"the TensorRT-RTX EP sees {len(devices)} device(s); device_id {provider.device_id} "
            "does not exist"
        )
    session_options.add_provider_for_devices([devices[provider.device_id]], provider.options())
