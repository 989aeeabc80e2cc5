"""TensorRT engines: the CPU pre-flight check (and, later, engine builds); onnx, tensorrt lazily."""

from __future__ import annotations

from echoembed.engines.preflight import (
    DynamicInput,
    PreflightConfig,
    PreflightReport,
    Problem,
    ProblemGroup,
    check_model,
    format_report,
    preflight,
    resolve_trt_version,
)

__all__ = [
    "DynamicInput",
    "PreflightConfig",
    "PreflightReport",
    "Problem",
    "ProblemGroup",
    "check_model",
    "format_report",
    "preflight",
    "resolve_trt_version",
]
