"""Typed quantization recipes (one frozen config class per recipe, no bags of string keys).

The config classes themselves live in ``echoembed.artifact.recipes`` (a manifest records them);
this module adds how a recipe is run (``QuantizeOptions``), picked by name and resolved.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from echoembed.artifact.recipes import (
    RECIPE_TYPES,
    Fp16Config,
    Int4QdqConfig,
    Int4WeightOnlyConfig,
    Int8BlockwiseConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    RecipeConfig,
    recipe_from_settings,
    settings_of,
)
from echoembed.calibration.data import CalibrationConfig
from echoembed.errors import UserError

__all__ = [
    "BUDGET_METRICS",
    "RECIPE_TYPES",
    "Fp16Config",
    "Int4QdqConfig",
    "Int4WeightOnlyConfig",
    "Int8BlockwiseConfig",
    "Int8DynamicConfig",
    "Int8StaticConfig",
    "QuantizeOptions",
    "RecipeConfig",
    "recipe_from_name",
    "recipe_from_settings",
    "resolve_recipe",
    "settings_of",
]

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
        "int8-blockwise": Int8BlockwiseConfig(),
        "int4-rtn": Int4WeightOnlyConfig(algorithm="rtn"),
        "int4-hqq": Int4WeightOnlyConfig(algorithm="hqq"),
        "int4-gptq": Int4WeightOnlyConfig(algorithm="gptq"),
        "int4-qdq": Int4QdqConfig(),
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
    runs those Q/DQ pairs in float; TensorRT uses int8 x int8). ``fold_row_scales=None`` becomes
    True for per-token activation scales, False for per-tensor ones.
    A setting the recipe cannot apply is refused here, not when a manifest is read (an artifact
    made by an older echoembed with it must still load): HQQ with ``symmetric=True``.
    """
    if isinstance(config, Int4WeightOnlyConfig) and config.symmetric and config.algorithm == "hqq":
        raise UserError(
            "HQQ quantizes asymmetrically (fractional zero points); symmetric=True applies "
            "to rtn and gptq"
        )
    if isinstance(config, Int8DynamicConfig) and config.fold_row_scales is None:
        config = dataclasses.replace(config, fold_row_scales=config.activation_scale == "token")
    if not isinstance(config, (Int8DynamicConfig, Int8StaticConfig)):
        return config
    if config.reduce_range is not None:
        return config
    from echoembed.runtime.cpu import runs_u8s8, u8s8_saturates

    return dataclasses.replace(config, reduce_range=runs_u8s8(config) and u8s8_saturates())


def _field_names(config: RecipeConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}
