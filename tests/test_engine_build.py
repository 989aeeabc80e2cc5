"""build-engine and the TensorRT runner: what runs without a GPU (the pre-flight refusal, the
install hints, the engine section of a manifest, the CUDA device query on a machine without a
driver), and GPU tests that build and run a real engine where TensorRT and a GPU exist."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil

import pytest

from echoembed.artifact import atomic_write, hash_files, read_manifest
from echoembed.artifact.engine import DEFAULT_PROFILE, EngineInfo, parse_profile
from echoembed.artifact.manifest import MANIFEST_NAME, Manifest
from echoembed.calibration import CalibrationConfig, Int8DynamicConfig, QuantizeOptions, quantize
from echoembed.cli.main import main
from echoembed.errors import ArtifactError, BackendError, InputError, MissingDependencyError
from echoembed.runtime import Embedder

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_CUDA_BINDINGS = importlib.util.find_spec("cuda") is not None and (
    importlib.util.find_spec("cuda.bindings") is not None
)


def _gpu_count() -> int:
    if not HAVE_CUDA_BINDINGS:
        return 0
    from cuda.bindings import runtime as rt

    err, count = rt.cudaGetDeviceCount()
    return int(count) if err == rt.cudaError_t.cudaSuccess else 0


GPU = _gpu_count() > 0
needs_trt_gpu = pytest.mark.skipif(
    not (HAVE_TRT and GPU),
    reason="needs TensorRT and a CUDA GPU ("
    + ("TensorRT is not installed" if not HAVE_TRT else "no CUDA GPU/driver here")
    + ")",
)


@pytest.fixture(scope="module")
def tiny_int8_dynamic(tiny_artifact, tmp_path_factory):
    options = QuantizeOptions(calibration=CalibrationConfig(samples=8, batch_size=4))
    out = tmp_path_factory.mktemp("engine-int8") / "int8-dynamic"
    return quantize(tiny_artifact.path, out, Int8DynamicConfig(), options)


def test_an_unimportable_graph_is_refused_before_asking_for_tensorrt(
    tiny_int8_dynamic, tmp_path, capsys
):
    code = main(["build-engine", str(tiny_int8_dynamic.path), str(tmp_path / "engine")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot import" in err
    assert "MatMulInteger" in err and "int8-static" in err
    assert not (tmp_path / "engine").exists()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here: the hint path needs it absent")
def test_build_engine_without_tensorrt_names_nvidias_index(tiny_artifact, tmp_path, capsys):
    code = main(["build-engine", str(tiny_artifact.path), str(tmp_path / "engine")])
    err = capsys.readouterr().err
    assert code == 2 and "pypi.nvidia.com" in err and "echoembed[tensorrt]" in err
    assert not (tmp_path / "engine").exists()


def test_build_engine_checks_its_options(tiny_artifact, tmp_path, capsys):
    assert main(["build-engine", str(tiny_artifact.path), str(tmp_path / "e"), "--profile",
                 "1,1:8,64"]) == 2  # fmt: skip
    assert "B_MIN,S_MIN:B_OPT,S_OPT:B_MAX,S_MAX" in capsys.readouterr().err
    from echoembed.engines.builder import BuildConfig

    with pytest.raises(InputError, match="at least one --profile"):
        BuildConfig(tiny_artifact.path, tmp_path / "e", profiles=())
    with pytest.raises(InputError, match="--workspace"):
        BuildConfig(tiny_artifact.path, tmp_path / "e", workspace_gb=0)


def _fake_engine_artifact(src, dst) -> Manifest:
    """An engine artifact's layout and manifest around a plan file that is not a real plan."""
    shutil.copytree(src.path, dst)
    (dst / "model.onnx").rename(dst / "model.plan")
    info = EngineInfo("10.13.0.35", "NVIDIA H200", "9.0",
                      (DEFAULT_PROFILE, parse_profile("1,1:1,64:4,128")), "fp32")  # fmt: skip
    m = dataclasses.replace(
        src.manifest, model_file="model.plan", engine=info, files=hash_files(dst)
    )
    atomic_write(dst / MANIFEST_NAME, m.to_json())
    return m


def test_engine_section_round_trips_and_is_described(tiny_artifact, tmp_path, capsys):
    m = _fake_engine_artifact(tiny_artifact, tmp_path / "engine")
    read = read_manifest(tmp_path / "engine")
    assert read == m and read.engine.profiles[1].max == (4, 128)
    assert main(["inspect", str(tmp_path / "engine")]) == 0
    out = capsys.readouterr().out
    assert "engine           TensorRT 10.13.0.35, NVIDIA H200 (compute capability 9.0)" in out
    assert "1,1:32,128:32,512 1,1:1,64:4,128" in out


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_an_engine_artifact_loads_through_the_tensorrt_runner(tiny_artifact, tmp_path):
    _fake_engine_artifact(tiny_artifact, tmp_path / "engine")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        Embedder.load(tmp_path / "engine")
    # tokenizer-only use of an engine artifact needs no TensorRT
    enc = Embedder.load(tmp_path / "engine", session=False).encoder()
    assert len(enc.encode(["hello"])) == 1


@pytest.mark.skipif(not HAVE_CUDA_BINDINGS or GPU, reason="needs cuda-bindings and no GPU")
def test_the_device_query_without_a_driver_is_a_backend_error():
    from echoembed.runtime.tensorrt import gpu_device

    with pytest.raises(BackendError, match=r"cudaGetDeviceCount failed: cudaError\w+"):
        gpu_device()


@pytest.mark.gpu
@needs_trt_gpu
def test_a_real_engine_matches_onnx_runtime(tiny_artifact, tmp_path):
    from echoembed.engines.builder import BuildConfig, build_engine

    art = build_engine(
        BuildConfig(tiny_artifact.path, tmp_path / "engine",
                    profiles=(parse_profile("1,1:4,32:8,128"),))  # fmt: skip
    )
    assert art.manifest.engine is not None and (art.path / "model.plan").is_file()
    texts = ["a short one", "a somewhat longer sentence about the weather today", "x"] * 3
    got = Embedder.load(art.path).encode(texts, batch_size=8)
    want = Embedder.load(tiny_artifact.path, providers=["CPUExecutionProvider"]).encode(texts)
    assert float((got * want).sum(axis=1).min()) >= 0.999
    with pytest.raises(InputError, match="outside every optimization profile"):
        Embedder.load(art.path).encode(["word " * 200])


@pytest.mark.gpu
@needs_trt_gpu
def test_an_engine_from_another_compute_capability_is_refused(tiny_artifact, tmp_path):
    from echoembed.runtime.tensorrt import gpu_device

    here = gpu_device().compute_capability
    other = "7.5" if here != "7.5" else "8.6"
    m = _fake_engine_artifact(tiny_artifact, tmp_path / "engine")
    import tensorrt

    info = dataclasses.replace(m.engine, compute_capability=other,
                               tensorrt_version=tensorrt.__version__)  # fmt: skip
    atomic_write(tmp_path / "engine" / MANIFEST_NAME,
                 dataclasses.replace(m, engine=info).to_json())  # fmt: skip
    with pytest.raises(ArtifactError, match=f"built for compute capability {other}"):
        Embedder.load(tmp_path / "engine")

