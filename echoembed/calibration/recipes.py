"""Typed quantization recipes (one frozen config class per recipe, no bags of string keys)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from echoembed.calibration.data import CalibrationConfig
from echoembed.errors import UserError


@dataclass(frozen=True)
class Int8DynamicConfig:
    """INT8 weights (per channel or per tensor), activations quantized at run time (uint8).

    ``smooth_alpha``: SmoothQuant the MLP down projections first (None: off).
    ``exclude``: linear node names (or fnmatch patterns, e.g. ``*.down_proj/*``) kept in fp32.
    """

    per_channel: bool = True
    smooth_alpha: float | None = 0.7
    exclude: tuple[str, ...] = ()

    recipe = "int8-dynamic"

    def __post_init__(self) -> None:
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise UserError(f"smooth_alpha must be in (0, 1) or None, got {self.smooth_alpha}")


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """4-bit block-wise weight-only quantization to MatMulNBits (activations stay float)."""

    algorithm: Literal["rtn", "hqq"] = "hqq"
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations, 0 = as input type
    symmetric: bool = False
    exclude: tuple[str, ...] = ()

    @property
    def recipe(self) -> str:
        return f"int4-{self.algorithm}"

    def __post_init__(self) -> None:
        if self.algorithm not in ("rtn", "hqq"):
            raise UserError(f"algorithm must be 'rtn' or 'hqq', got {self.algorithm!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError(f"block_size must be a power of two >= 16, got {self.block_size}")


RecipeConfig = Int8DynamicConfig | Int4WeightOnlyConfig
RECIPES: dict[str, type] = {"int8-dynamic": Int8DynamicConfig, "int4": Int4WeightOnlyConfig}


@dataclass(frozen=True)
class QuantizeOptions:
    """How to run a recipe: calibration data, the accuracy budget, the target."""

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    max_drop: float | None = None  # allowed drop of mean cosine vs the fp32 parent, e.g. 0.005
    max_float_fraction: float = 0.5  # the search keeps at most this share of layers in float
    allow_over_budget: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if self.max_drop is not None and not 0.0 <= self.max_drop < 1.0:
            raise UserError(f"max_drop must be in [0, 1), got {self.max_drop}")
        if not 0.0 <= self.max_float_fraction <= 1.0:
            raise UserError(f"max_float_fraction must be in [0, 1], got {self.max_float_fraction}")


def recipe_from_name(name: str) -> RecipeConfig:
    """A default config from a CLI recipe name."""
    table: dict[str, RecipeConfig] = {
        "int8-dynamic": Int8DynamicConfig(),
        "int4-rtn": Int4WeightOnlyConfig(algorithm="rtn"),
        "int4-hqq": Int4WeightOnlyConfig(algorithm="hqq"),
    }
    if name not in table:
        raise UserError(f"unknown recipe {name!r}; available: {sorted(table)}")
    return table[name]


def settings_of(config: RecipeConfig) -> dict[str, Any]:
    """The config as JSON-ready settings for the manifest."""
    return {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()
    }
