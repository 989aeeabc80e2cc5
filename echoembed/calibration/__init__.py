"""Calibration and quantization of fp32 artifacts (onnx, onnxruntime.quantization)."""

from __future__ import annotations

from echoembed.calibration.data import (
    CalibrationConfig,
    CalibrationSet,
    FixedShapeReader,
    load_calibration,
    read_texts_any,
)
from echoembed.calibration.quantize import quantize
from echoembed.calibration.recipes import (
    Fp16Config,
    Int4QdqConfig,
    Int4WeightOnlyConfig,
    Int8BlockwiseConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    QuantizeOptions,
    recipe_from_name,
)

__all__ = [
    "CalibrationConfig",
    "CalibrationSet",
    "FixedShapeReader",
    "Fp16Config",
    "Int4QdqConfig",
    "Int4WeightOnlyConfig",
    "Int8BlockwiseConfig",
    "Int8DynamicConfig",
    "Int8StaticConfig",
    "QuantizeOptions",
    "load_calibration",
    "quantize",
    "read_texts_any",
    "recipe_from_name",
]
