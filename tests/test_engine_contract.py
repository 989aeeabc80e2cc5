"""The GPU path's decisions that need no GPU: optimization profiles, engine compatibility, and
ONNX Runtime GPU provider options and their refusal to fall back silently."""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest

from echoembed.artifact.engine import (
    DEFAULT_PROFILE,
    EngineInfo,
    Profile,
    check_engine_compatible,
    choose_profile,
    ort_profile_options,
    parse_profile,
)
from echoembed.errors import ArtifactError, BackendError, InputError, MissingDependencyError
from echoembed.runtime import Embedder
from echoembed.runtime.providers import (
    CudaProvider,
    TensorRTProvider,
    TensorRTRtxProvider,
    provider_name,
)

NO_CUDA = "CUDAExecutionProvider" not in ort.get_available_providers()


def test_profile_parses_the_cli_form():
    p = parse_profile("1,1:8,128:32,512")
    assert (p.min, p.opt, p.max) == ((1, 1), (8, 128), (32, 512))
    assert p.spec() == "1,1:8,128:32,512"
    assert Profile.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "text",
    ["1,1:8,128", "1,1:8,128:32", "a,1:8,128:32,512", "0,1:8,128:32,512", "1,1;8,128;32,512"],
)
def test_malformed_profiles_are_input_errors(text):
    with pytest.raises(InputError):
        parse_profile(text)


def test_profile_needs_min_opt_max_in_order():
    with pytest.raises(InputError, match="batch must satisfy min <= opt <= max"):
        parse_profile("4,1:2,128:32,512")
    with pytest.raises(InputError, match="sequence must satisfy min <= opt <= max"):
        parse_profile("1,1:8,600:32,512")


def test_choose_profile_takes_the_smallest_that_holds_the_batch():
    small = parse_profile("1,1:1,64:4,128")
    large = parse_profile("1,1:16,256:32,512")
    profiles = (large, small)
    assert choose_profile(profiles, 2, 100) == 1  # both hold it: the smaller one
    assert choose_profile(profiles, 8, 100) == 0  # batch over the small one
    assert choose_profile(profiles, 1, 300) == 0  # sequence over the small one
    assert choose_profile(profiles, 32, 512) == 0  # the limits themselves are inside
    with pytest.raises(InputError, match=r"33 prompts x 10 tokens.*#0: batch 1-32, sequence 1-512"):
        choose_profile(profiles, 33, 10)
    with pytest.raises(InputError, match="rebuild the engine with a larger --profile"):
        choose_profile(profiles, 1, 513)


def test_ort_profile_options_list_every_input_once_per_profile():
    opts = ort_profile_options(
        (parse_profile("1,1:2,8:4,16"), parse_profile("1,1:8,64:32,128")),
        ("input_ids", "attention_mask", "pool_mask"),
    )
    assert opts["trt_profile_min_shapes"] == (
        "input_ids:1x1,attention_mask:1x1,pool_mask:1x1,"
        "input_ids:1x1,attention_mask:1x1,pool_mask:1x1"
    )
    assert opts["trt_profile_opt_shapes"].split(",")[0] == "input_ids:2x8"
    assert opts["trt_profile_max_shapes"].split(",")[-1] == "pool_mask:32x128"
    with pytest.raises(InputError):
        ort_profile_options((), ("input_ids",))


def _engine(**kw) -> EngineInfo:
    base = dict(
        tensorrt_version="10.13.0.35",
        device_name="NVIDIA H200",
        compute_capability="9.0",
        profiles=(DEFAULT_PROFILE,),
        precision="fp16",
    )
    return EngineInfo(**{**base, **kw})


def test_engine_info_round_trips_and_rejects_bad_fields():
    e = _engine(version_compatible=True, hardware_compatibility="ampere+")
    assert EngineInfo.from_dict(e.to_dict()) == e
    with pytest.raises(ArtifactError, match="hardware compatibility"):
        _engine(hardware_compatibility="turing+")
    with pytest.raises(ArtifactError, match="compute capability"):
        _engine(compute_capability="sm90")
    with pytest.raises(ArtifactError, match="malformed engine section"):
        EngineInfo.from_dict({"tensorrt_version": "10.13"})


@pytest.mark.parametrize(
    ("engine", "running", "cc", "problem"),
    [
        ({}, "10.13.0.35", "9.0", None),
        ({}, "10.13.0", "9.0", None),  # the build number is not part of the decision
        ({}, "10.14.1", "9.0", "a plan runs only on the TensorRT that built it"),
        ({}, "10.13.0", "8.9", "built for compute capability 9.0"),
        ({"version_compatible": True}, "10.16.1", "9.0", None),
        ({"version_compatible": True}, "11.1.0", "9.0", None),  # 10 -> 11 is supported
        ({"version_compatible": True}, "10.12.0", "9.0", "newer than this TensorRT"),
        ({"version_compatible": True, "tensorrt_version": "8.6.1"}, "11.0.0", "9.0",
         "cross major versions only from 8 to 10 and from 10 to 11"),  # fmt: skip
        ({"hardware_compatibility": "ampere+"}, "10.13.0", "8.6", None),
        ({"hardware_compatibility": "ampere+"}, "10.13.0", "7.5", "Ampere and newer"),
        ({"hardware_compatibility": "same-cc"}, "10.13.0", "9.0", None),
        ({"hardware_compatibility": "same-cc"}, "10.13.0", "10.0", "compute capability 9.0"),
    ],
)
def test_engine_compatibility(engine, running, cc, problem):
    info = _engine(**engine)
    if problem is None:
        check_engine_compatible(info, running, cc)
    else:
        with pytest.raises(ArtifactError, match=problem) as e:
            check_engine_compatible(info, running, cc)
        assert "echoembed build-engine" in str(e.value)


def test_tensorrt_provider_options():
    p = TensorRTProvider(
        fp16=True,
        engine_cache_dir="/tmp/engines",
        timing_cache_dir="/tmp/timing",
        profiles=(parse_profile("1,1:8,128:32,512"),),
        workspace_gb=2,
        ep_context_file="/tmp/ctx.onnx",
    )
    opts = p.options()
    assert provider_name(p) == "TensorrtExecutionProvider"
    assert opts["trt_fp16_enable"] == "True" and opts["device_id"] == "0"
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == "/tmp/engines"
    assert opts["trt_timing_cache_path"] == "/tmp/timing"
    assert opts["trt_max_workspace_size"] == str(2 << 30)
    assert opts["trt_profile_opt_shapes"] == (
        "input_ids:8x128,attention_mask:8x128,pool_mask:8x128"
    )
    assert opts["trt_dump_ep_context_model"] == "True"
    assert TensorRTProvider().options() == {"device_id": "0", "trt_fp16_enable": "False"}
    assert CudaProvider(device_id=1).options() == {"device_id": "1"}
    with pytest.raises(InputError):
        CudaProvider(device_id=-1).options()


@pytest.mark.skipif(not NO_CUDA, reason="this onnxruntime has CUDA: the refusal needs a CPU build")
@pytest.mark.parametrize("provider", [CudaProvider(), TensorRTProvider(fp16=True)])
def test_a_missing_gpu_provider_is_refused_not_silently_replaced(tiny_artifact, caplog, provider):
    with pytest.raises(BackendError, match="onnxruntime-gpu") as e:
        Embedder.load(tiny_artifact.path, providers=[provider, "CPUExecutionProvider"])
    assert provider.name in str(e.value)
    with caplog.at_level(logging.WARNING, logger="echoembed.runtime.ort"):
        emb = Embedder.load(tiny_artifact.path, providers=[provider], allow_fallback=True)
    assert emb.runner.providers == ["CPUExecutionProvider"] and "falling back" in caplog.text
    assert emb.encode(["hello"]).shape == (1, emb.hidden_size)


def test_rtx_plugin_missing_names_the_extra(tiny_artifact, tmp_path):
    with pytest.raises(MissingDependencyError, match=r"echoembed\[rtx\]"):
        Embedder.load(tiny_artifact.path, providers=[TensorRTRtxProvider()])
    with pytest.raises(MissingDependencyError, match="does not exist"):
        TensorRTRtxProvider(library_path=str(tmp_path / "nope.so")).library()
