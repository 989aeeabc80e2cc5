"""The TensorRT runner: an engine artifact's plan on one GPU, through cuda-bindings (no torch).

``pip install 'echoembed[tensorrt]'`` brings ``tensorrt`` (from NVIDIA's package index: PyPI's
``tensorrt`` is a stub that downloads from there) and ``cuda-bindings``. Before the plan is
deserialized, the engine artifact's TensorRT version and compute capability are compared with the
running ones (``artifact.engine.check_engine_compatible``): TensorRT itself only logs "...please
rebuild" and returns ``None``. Each batch runs under the smallest optimization profile that holds
its shape; a batch beyond every profile is an ``InputError`` naming the limits.

Written against TensorRT 10/11's name-based API (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) and cuda-bindings' runtime API (``cudaMallocAsync``, ``cudaMemcpyAsync``,
streams). Not run on this project's machines (none has TensorRT): the ``gpu`` tests run it where
the library and a GPU exist.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from echoembed.artifact.engine import EngineInfo, check_engine_compatible, choose_profile
from echoembed.echo import INPUT_NAMES, EncodedBatch, strip_prefix
from echoembed.errors import ArtifactError, BackendError, MissingDependencyError

TENSORRT_HINT = (
    "pip install 'echoembed[tensorrt]' --extra-index-url https://pypi.nvidia.com (PyPI's "
    "tensorrt package fetches its libraries from NVIDIA's index; it needs a machine with an "
    "NVIDIA GPU and driver)"
)


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as e:
        raise MissingDependencyError(
            f"cuda-bindings is not installed; install it with: {TENSORRT_HINT}"
        ) from e
    return runtime


def _tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise MissingDependencyError(
            f"TensorRT is not installed; install it with: {TENSORRT_HINT}"
        ) from e
    return tensorrt


def installed_tensorrt_version() -> str | None:
    """The importable TensorRT's version, or None."""
    try:
        return str(_tensorrt().__version__)
    except MissingDependencyError:
        return None


def cuda_call(result: Any, what: str) -> Any:
    """Unwrap a cuda-bindings ``(error, value...)`` result; BackendError naming the error."""
    cudart = _cudart()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        hint = ""
        if err == cudart.cudaError_t.cudaErrorInsufficientDriver:
            hint = " (no NVIDIA driver on this machine, or one older than this CUDA runtime)"
        elif err == cudart.cudaError_t.cudaErrorNoDevice:
            hint = " (no CUDA GPU is visible: check CUDA_VISIBLE_DEVICES and nvidia-smi)"
        raise BackendError(f"{what} failed: {err.name}: {text.decode(errors='replace')}{hint}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


@dataclass(frozen=True)
class GpuDevice:
    """One CUDA device, as an engine's compatibility check needs it."""

    index: int
    name: str
    compute_capability: str  # e.g. "9.0"
    memory_bytes: int


def gpu_device(index: int = 0) -> GpuDevice:
    """The CUDA device ``index`` (BackendError when there is no driver or no such device)."""
    cudart = _cudart()
    count = cuda_call(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not 0 <= index < count:
        raise BackendError(f"CUDA device {index} does not exist; this machine has {count}")
    props = cuda_call(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    return GpuDevice(
        index, name.rstrip("\x00"), f"{props.major}.{props.minor}", int(props.totalGlobalMem)
    )


def _np_dtype(trt: Any, dtype: Any) -> np.dtype:
    table = {
        trt.DataType.FLOAT: np.float32,
        trt.DataType.HALF: np.float16,
        trt.DataType.INT32: np.int32,
        trt.DataType.INT64: np.int64,
    }
    if dtype not in table:
        raise ArtifactError(
            f"the engine has an I/O tensor of type {dtype}, which echoembed does not feed"
        )
    return np.dtype(table[dtype])


class TensorRTRunner:
    """Runner over a deserialized TensorRT engine (one execution context; calls serialize)."""

    def __init__(
        self,
        plan_path: Path,
        info: EngineInfo,
        output_name: str,
        device: int = 0,
        prefix_ids: tuple[int, ...] = (),
    ):
        trt, cudart = _tensorrt(), _cudart()
        self.info, self.output_name, self.plan_path = info, output_name, Path(plan_path)
        self.prefix_ids = tuple(prefix_ids)  # baked shared prefix: stripped from every row
        self.device = gpu_device(device)
        check_engine_compatible(info, trt.__version__, self.device.compute_capability)
        cuda_call(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if info.version_compatible:
            self._runtime.engine_host_code_allowed = True  # the plan carries its lean runtime
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(
                f"TensorRT {trt.__version__} could not deserialize {self.plan_path} (its log above "
                "says why); rebuild it on this machine: echoembed build-engine ONNX_ARTIFACT OUT"
            )
        self.context = self.engine.create_execution_context()
        self.stream = cuda_call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in INPUT_NAMES if n in names]
        if output_name not in names:
            raise ArtifactError(f"the engine has no output {output_name!r} (it has {names})")
        self._dtypes = {n: _np_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._profile: int | None = None
        self._lock = threading.Lock()
        self.providers = ["TensorRT"]

    def _set_profile(self, batch: int, seq: int) -> None:
        index = choose_profile(self.info.profiles, batch, seq)
        if index != self._profile:
            ok = self.context.set_optimization_profile_async(index, int(self.stream))
            if not ok:
                raise BackendError(f"TensorRT refused optimization profile {index}")
            self._profile = index

    def encode(self, batch: EncodedBatch) -> np.ndarray:
        cudart = _cudart()
        batch = strip_prefix(batch, self.prefix_ids)
        feed = batch.feed()
        with self._lock:
            self._set_profile(*batch.input_ids.shape)
            owned: list[Any] = []
            try:
                hosts = {}
                for name in self.input_names:
                    host = np.ascontiguousarray(feed[name], dtype=self._dtypes[name])
                    if not self.context.set_input_shape(name, host.shape):
                        raise BackendError(f"TensorRT refused shape {host.shape} for {name}")
                    hosts[name] = host
                out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                               dtype=self._dtypes[self.output_name])  # fmt: skip
                for name, host in (*hosts.items(), (self.output_name, out)):
                    ptr = cuda_call(cudart.cudaMallocAsync(host.nbytes, self.stream), "cudaMalloc")
                    owned.append(ptr)
                    self.context.set_tensor_address(name, int(ptr))
                    if name != self.output_name:
                        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
                        cuda_call(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d,
                                                         self.stream), "cudaMemcpy")  # fmt: skip
                if not self.context.execute_async_v3(int(self.stream)):
                    raise BackendError(
                        f"TensorRT failed on a batch of shape {batch.input_ids.shape} (its log "
                        "above says why)"
                    )
                d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
                cuda_call(cudart.cudaMemcpyAsync(out.ctypes.data, owned[-1], out.nbytes, d2h,
                                                 self.stream), "cudaMemcpy")  # fmt: skip
                cuda_call(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            finally:
                for ptr in owned:
                    cudart.cudaFreeAsync(ptr, self.stream)
        return out.astype(np.float32, copy=False)
