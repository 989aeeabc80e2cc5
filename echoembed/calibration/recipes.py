"""Typed quantization recipes (one frozen config class per recipe, no bags of string keys)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from echoembed.calibration.data import CalibrationConfig
from echoembed.errors import UserError


@dataclass(frozen=True)
class Int8DynamicConfig:
    """INT8 weights (per channel or per tensor), activations quantized at run time (uint8).

    ``smooth_alpha``: SmoothQuant the MLP down projections first (None: off).
    ``exclude``: linear node names (or fnmatch patterns, e.g. ``*.down_proj/*``) kept in fp32.
    ``reduce_range``: 7-bit weights (|q| <= 64), which ONNX Runtime's u8 x s8 kernels need on
    x86-64 CPUs without VNNI, where 8-bit weights saturate (``echoembed.runtime.cpu``); None
    decides from the CPU that quantizes (see ``resolve_recipe``).
    """

    per_channel: bool = True
    smooth_alpha: float | None = 0.7
    exclude: tuple[str, ...] = ()
    reduce_range: bool | None = None

    recipe = "int8-dynamic"

    def __post_init__(self) -> None:
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise UserError(f"smooth_alpha must be in (0, 1) or None, got {self.smooth_alpha}")


@dataclass(frozen=True)
class Int8StaticConfig:
    """INT8 static QDQ: activation ranges measured on calibration data, symmetric int8 activations
    and weights (zero point 0), so TensorRT can consume the same graph as ONNX Runtime.

    ``method``: ``minmax``, ``percentile`` (of |x|, ``percentile``) or ``entropy`` (KL).
    ``activations``: ``int8`` (zero point 0, for TensorRT) or ``uint8`` (zero point 128, the same
    symmetric grid, which ONNX Runtime's CPU provider fuses; with int8 it runs at fp32 speed).
    ``reduce_range``: 7-bit weights, as for ``Int8DynamicConfig``; it matters for ``uint8``
    activations only (the fused u8 x s8 kernel); None decides from the CPU that quantizes.
    """

    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    activations: Literal["int8", "uint8"] = "int8"
    percentile: float = 99.999
    per_channel: bool = True
    smooth_alpha: float | None = 0.7
    exclude: tuple[str, ...] = ()
    reduce_range: bool | None = None

    recipe = "int8-static"

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "percentile", "entropy"):
            raise UserError(
                f"method must be minmax, percentile or entropy, got {self.method!r}"
            )
        if self.activations not in ("int8", "uint8"):
            raise UserError(f"activations must be 'int8' or 'uint8', got {self.activations!r}")
        if not 90.0 <= self.percentile <= 100.0:
            raise UserError(f"percentile must be in [90, 100], got {self.percentile}")
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise UserError(f"smooth_alpha must be in (0, 1) or None, got {self.smooth_alpha}")


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """4-bit block-wise weight-only quantization to MatMulNBits (activations stay float).

    ``algorithm``: ``rtn`` (round to nearest), ``hqq`` (half-quadratic, no data) or ``gptq``
    (second-order, uses the calibration texts; ``float_zero`` stores fractional zero points, as
    HQQ does, which reproduce a Q4_1 checkpoint's grid exactly). ``quantize_embedding``: the
    token embedding table becomes a 4-bit GatherBlockQuantized too (RTN, blocks along hidden).
    """

    algorithm: Literal["rtn", "hqq", "gptq"] = "hqq"
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations, 0 = as input type
    symmetric: bool = False
    quantize_embedding: bool = True
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    float_zero: bool = True  # GPTQ: fractional zero points (asymmetric only)
    exclude: tuple[str, ...] = ()

    @property
    def recipe(self) -> str:
        return f"int4-{self.algorithm}"

    def __post_init__(self) -> None:
        if self.algorithm not in ("rtn", "hqq", "gptq"):
            raise UserError(f"algorithm must be 'rtn', 'hqq' or 'gptq', got {self.algorithm!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        if self.symmetric and self.float_zero and self.algorithm == "gptq":
            raise UserError("float_zero needs asymmetric quantization (symmetric=False)")
        if not 0.0 < self.gptq_damp < 1.0:
            raise UserError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")


@dataclass(frozen=True)
class Fp16Config:
    """fp16 weights and compute, with fp32 inputs/outputs; ``fp32_ops`` stay in fp32."""

    fp32_ops: tuple[str, ...] = (
        "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "ReduceSum", "ReduceL2", "Div",
        "CumSum", "Range", "Sin", "Cos",
    )  # fmt: skip
    exclude: tuple[str, ...] = ()

    recipe = "fp16"


RecipeConfig = Int8DynamicConfig | Int8StaticConfig | Int4WeightOnlyConfig | Fp16Config
RECIPE_TYPES = (Int8DynamicConfig, Int8StaticConfig, Int4WeightOnlyConfig, Fp16Config)
BUDGET_METRICS = ("cosine", "spearman")


@dataclass(frozen=True)
class QuantizeOptions:
    """How to run a recipe: calibration data, the accuracy budget, the target.

    The budget: ``max_drop`` of ``metric`` vs the fp32 parent, either mean cosine on held-out
    texts (``cosine``, e.g. 0.005) or STS Spearman points x100 on ``sts`` (``spearman``, e.g.
    0.5; ``sts`` defaults to the calibration file when that is an STS TSV; ``sts_limit`` pairs).
    """

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    max_drop: float | None = None
    metric: Literal["cosine", "spearman"] = "cosine"
    sts: str | os.PathLike[str] | None = None
    sts_limit: int | None = 500
    max_float_fraction: float = 0.5  # the search keeps at most this share of layers in float
    calibration_cache: str | os.PathLike[str] | None = None  # INT8 static ranges (JSON)
    allow_over_budget: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if self.metric not in BUDGET_METRICS:
            raise UserError(f"metric must be one of {BUDGET_METRICS}, got {self.metric!r}")
        top = 1.0 if self.metric == "cosine" else 100.0
        if self.max_drop is not None and not 0.0 <= self.max_drop < top:
            raise UserError(
                f"max_drop for {self.metric} must be in [0, {top:g}) "
                f"({'mean cosine' if top == 1.0 else 'Spearman points'}), got {self.max_drop}"
            )
        if not 0.0 <= self.max_float_fraction <= 1.0:
            raise UserError(f"max_float_fraction must be in [0, 1], got {self.max_float_fraction}")
        if self.sts_limit is not None and self.sts_limit < 10:
            raise UserError(f"sts_limit must be >= 10 pairs, got {self.sts_limit}")


def recipe_from_name(name: str, **overrides: Any) -> RecipeConfig:
    """A config from a CLI recipe name, with the given fields changed (None means default).

    A field the recipe does not have is an error naming the recipes that take it.
    """
    table: dict[str, RecipeConfig] = {
        "int8-dynamic": Int8DynamicConfig(),
        "int8-static": Int8StaticConfig(),
        "int4-rtn": Int4WeightOnlyConfig(algorithm="rtn"),
        "int4-hqq": Int4WeightOnlyConfig(algorithm="hqq"),
        "int4-gptq": Int4WeightOnlyConfig(algorithm="gptq"),
        "fp16": Fp16Config(),
    }
    if name not in table:
        raise UserError(f"unknown recipe {name!r}; available: {sorted(table)}")
    config = table[name]
    fields = _field_names(config)
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key in changes:
        if key not in fields:
            takes = [n for n, c in table.items() if key in _field_names(c)]
            raise UserError(
                f"recipe {name} has no setting {key!r} (it applies to: "
                f"{', '.join(takes) or 'none'})"
            )
    return dataclasses.replace(config, **changes)


def resolve_recipe(config: RecipeConfig) -> RecipeConfig:
    """The config with every "decide here" setting decided, as the manifest records it.

    ``reduce_range=None`` becomes True where this CPU's u8 x s8 kernels saturate with 8-bit
    weights (x86-64 without VNNI), and for INT8 static with int8 activations False (ONNX Runtime
    runs those Q/DQ pairs in float; TensorRT uses int8 x int8).
    """
    if not isinstance(config, (Int8DynamicConfig, Int8StaticConfig)):
        return config
    if config.reduce_range is not None:
        return config
    from echoembed.runtime.cpu import runs_u8s8, u8s8_saturates

    u8 = runs_u8s8(config.recipe, getattr(config, "activations", None))
    return dataclasses.replace(config, reduce_range=u8 and u8s8_saturates())


def _field_names(config: RecipeConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


def settings_of(config: RecipeConfig) -> dict[str, Any]:
    """The config as JSON-ready settings for the manifest."""
    return {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()
    }
