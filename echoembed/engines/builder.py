"""``echoembed build-engine``: an ONNX artifact -> a TensorRT engine artifact.

The graph is first checked by the CPU pre-flight (``engines.preflight``): a graph TensorRT cannot
import is refused before any GPU work, with the recipe to use instead. Then it is parsed and built
as a *strongly typed* network (TensorRT 10: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``;
TensorRT 11: always): precision comes from the graph itself (an fp16 artifact, Q/DQ for INT8 and
INT4), never from builder flags, which TensorRT 11 removed. One optimization profile per
``--profile`` covers all three ``[batch, seq]`` inputs. An optional timing cache is read before and
written after the build (tied to GPU, CUDA and TensorRT version). ``--version-compatible`` and
``--hardware-compat ampere+`` trade speed for plans that run on later TensorRT versions / other
GPUs (``artifact.engine`` has the rules).

The engine artifact: ``model.plan``, ``tokenizer.json`` and a manifest whose ``engine`` section
records the TensorRT version, GPU name and compute capability, profiles, compatibility flags and
the source artifact's checksums. Written through ``staged_dir``: nothing half-built is left.

Written against TensorRT 10.x/11.x's documented Python API; no machine of this project has
TensorRT, so it has not been run here (the ``gpu`` tests run it where the library exists).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoembed.artifact import (
    TOKENIZER_NAME,
    Artifact,
    atomic_write,
    hash_files,
    read_manifest,
    staged_dir,
    verify_files,
)
from echoembed.artifact.engine import (
    DEFAULT_PROFILE,
    HARDWARE_LEVELS,
    PLAN_FILE,
    EngineInfo,
    Profile,
)
from echoembed.artifact.manifest import MANIFEST_NAME
from echoembed.errors import ExportError, InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    """What ``build_engine`` builds, from which ONNX artifact, and how."""

    artifact: Path  # an ONNX artifact (export / quantize)
    out: Path  # the engine artifact to create
    profiles: tuple[Profile, ...] = (DEFAULT_PROFILE,)
    timing_cache: Path | None = None  # read if present, written after the build
    workspace_gb: float | None = None  # TensorRT's workspace memory pool limit
    hardware_compat: str = "none"  # none | ampere+ | same-cc
    version_compatible: bool = False
    device: int = 0
    force: bool = False

    def __post_init__(self) -> None:
        if not self.profiles:
            raise InputError("build-engine needs at least one --profile")
        if self.hardware_compat not in HARDWARE_LEVELS:
            raise InputError(
                f"--hardware-compat must be one of {list(HARDWARE_LEVELS)}, got "
                f"{self.hardware_compat!r}"
            )
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise InputError(f"--workspace must be > 0 GB, got {self.workspace_gb!r}")


def _refuse_unimportable(config: BuildConfig, trt_version: str | None) -> None:
    """Run the CPU pre-flight; ExportError listing what TensorRT would reject, and the fix."""
    from echoembed.engines.preflight import PreflightConfig, format_report, preflight

    table = trt_version if trt_version and trt_version.split(".")[0] == "10" else None
    if trt_version is not None and table is None:
        log.warning(
            "the pre-flight's parser tables are TensorRT 10.x; checking for TensorRT %s against "
            "the newest one",
            trt_version,
        )
    report = preflight(PreflightConfig(artifact=Path(config.artifact), trt_version=table))
    if not report.passed:
        raise ExportError(
            f"TensorRT {trt_version or report.table_version} cannot import {config.artifact}:\n"
            f"{format_report(report)}"
        )


def _network(trt: Any, builder: Any, logger: Any, model_path: Path) -> tuple[Any, Any]:
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(
            f"TensorRT's ONNX parser rejected {model_path}:\n  " + "\n  ".join(errors[:10])
        )
    return network, parser


def _builder_config(trt: Any, builder: Any, network: Any, config: BuildConfig) -> Any:
    bc = builder.create_builder_config()
    if config.workspace_gb is not None:
        bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * 2**30))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    for p in config.profiles:
        profile = builder.create_optimization_profile()
        for name in names:
            profile.set_shape(name, p.min, p.opt, p.max)
        bc.add_optimization_profile(profile)
    if config.version_compatible:
        bc.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    level = {"ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}.get(
        config.hardware_compat
    )
    if level is not None:
        bc.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    return bc


def _timing_cache(bc: Any, path: Path | None) -> Any:
    if path is None:
        return None
    blob = path.read_bytes() if path.is_file() else b""
    cache = bc.create_timing_cache(blob)
    bc.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_plan(config: BuildConfig, model_path: Path) -> tuple[bytes, str]:
    """Parse and build; returns (serialized plan, the TensorRT version that built it)."""
    from echoembed.runtime.tensorrt import _tensorrt

    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _network(trt, builder, logger, model_path)
    bc = _builder_config(trt, builder, network, config)
    _timing_cache(bc, config.timing_cache)
    log.info("building a TensorRT engine from %s (this takes minutes)", model_path)
    plan = builder.build_serialized_network(network, bc)
    if plan is None:
        raise ExportError(
            f"TensorRT could not build an engine from {model_path} (its log above says why)"
        )
    if config.timing_cache is not None:
        atomic_write(config.timing_cache, bytes(bc.get_timing_cache().serialize()))
    return bytes(plan), str(trt.__version__)


def build_engine(config: BuildConfig) -> Artifact:
    """ONNX artifact -> engine artifact (plan + tokenizer + manifest with its ``engine``)."""
    from echoembed.runtime.tensorrt import _tensorrt, gpu_device, installed_tensorrt_version

    src = Path(config.artifact)
    manifest = read_manifest(src)
    verify_files(src, manifest)
    if manifest.engine is not None:
        raise InputError(f"{src} is already an engine artifact; pass its ONNX artifact")
    # Before any GPU work, and before asking for TensorRT: would its parser take this graph?
    _refuse_unimportable(config, installed_tensorrt_version())
    _tensorrt()
    device = gpu_device(config.device)
    plan, version = build_plan(config, src / manifest.model_file)
    info = EngineInfo(
        tensorrt_version=version,
        device_name=device.name,
        compute_capability=device.compute_capability,
        profiles=tuple(config.profiles),
        precision=manifest.precision,
        version_compatible=config.version_compatible,
        hardware_compatibility=config.hardware_compat,
        source_files=dict(manifest.files),
    )

    def _verify(path: Path) -> None:
        verify_files(path, read_manifest(path))

    with staged_dir(config.out, force=config.force, verify=_verify) as stage:
        (stage.path / PLAN_FILE).write_bytes(plan)
        shutil.copy2(src / TOKENIZER_NAME, stage.path / TOKENIZER_NAME)
        versions = {**manifest.versions, "tensorrt": version}
        out = dataclasses.replace(
            manifest,
            model_file=PLAN_FILE,
            engine=info,
            files=hash_files(stage.path),
            versions=versions,
        )
        atomic_write(stage.path / MANIFEST_NAME, out.to_json())
    return Artifact(Path(config.out), out)


def parse_profiles(specs: Sequence[str] | None) -> tuple[Profile, ...]:
    """``--profile`` values -> profiles (the default profile when none is given)."""
    from echoembed.artifact.engine import parse_profile

    return tuple(parse_profile(s) for s in specs) if specs else (DEFAULT_PROFILE,)


__all__ = ["BuildConfig", "build_engine", "build_plan", "parse_profiles"]
