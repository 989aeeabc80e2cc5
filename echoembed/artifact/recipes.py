"""The quantization recipes' typed settings: one frozen config class per recipe.

They live in ``artifact`` because a quantized manifest records its recipe's own config
(``QuantizationInfo.settings``), which the runtime reads without importing ``calibration``.
``recipe_from_settings`` rebuilds a config from a manifest's JSON; ``settings_of`` is the reverse.
stdlib only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from echoembed.errors import ArtifactError, UserError


def _check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"block_size must be a power of two >= 16, got {block_size}")


def _check_matmulnbits(block_size: int, accuracy_level: int) -> None:
    """The settings every MatMulNBits recipe shares."""
    _check_block_size(block_size)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UserError(f"accuracy_level must be 0..4, got {accuracy_level}")


@dataclass(frozen=True)
class Int8DynamicConfig:
    """INT8 weights (per channel or per tensor), activations quantized at run time (uint8).

    ``smooth_alpha``: SmoothQuant the MLP down projections first (None: off).
    ``exclude``: linear node names (or fnmatch patterns, e.g. ``*.down_proj/*``) kept in fp32.
    ``reduce_range``: 7-bit weights (|q| <= 64), which ONNX Runtime's u8 x s8 kernels need on
    x86-64 CPUs without VNNI, where 8-bit weights saturate (``echoembed.runtime.cpu``); None
    decides from the CPU that quantizes (see ``resolve_recipe``).
    ``weights``: ``int8`` (symmetric, the u8 x s8 kernels) or ``uint8`` (asymmetric with a zero
    point: ONNX Runtime's u8 x u8 kernels, which widen to 16 bits before multiplying and never
    saturate, so they need no 7-bit weights on any CPU).
    ``activation_scale``: ``token`` (a symmetric scale per token, ``calibration.per_token``: a
    text embeds the same whatever it is batched with) or ``tensor`` (ONNX Runtime's
    ``DynamicQuantizeLinear``: one scale for the whole batch, the fastest; a text's embedding
    depends on its batch-mates). Manifests written before this setting existed mean ``tensor``.
    ``fold_row_scales``: with per-token scales, a projection that only feeds a product quantized
    per token (a gated MLP's up projection) skips its row scale, which the next scales take
    instead (``calibration.per_token.fold_row_scales``; exact but for float rounding, faster);
    None: on for ``token``, off for ``tensor``, which has no row scales. Manifests written before
    this setting existed mean off.
    """

    per_channel: bool = True
    smooth_alpha: float | None = 0.7
    exclude: tuple[str, ...] = ()
    reduce_range: bool | None = None
    weights: Literal["int8", "uint8"] = "int8"
    activation_scale: Literal["token", "tensor"] = "token"
    fold_row_scales: bool | None = None

    recipe = "int8-dynamic"

    def __post_init__(self) -> None:
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise UserError(f"smooth_alpha must be in (0, 1) or None, got {self.smooth_alpha}")
        if self.weights not in ("int8", "uint8"):
            raise UserError(f"weights must be 'int8' or 'uint8', got {self.weights!r}")
        if self.activation_scale not in ("token", "tensor"):
            raise UserError(
                f"activation_scale must be 'token' or 'tensor', got {self.activation_scale!r}"
            )
        if self.fold_row_scales and self.activation_scale != "token":
            raise UserError(
                "fold_row_scales=True needs activation_scale='token' (per-tensor scales have no "
                "row scales to fold); leave it None"
            )


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
            raise UserError(f"method must be minmax, percentile or entropy, got {self.method!r}")
        if self.activations not in ("int8", "uint8"):
            raise UserError(f"activations must be 'int8' or 'uint8', got {self.activations!r}")
        if not 90.0 <= self.percentile <= 100.0:
            raise UserError(f"percentile must be in [90, 100], got {self.percentile}")
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise UserError(f"smooth_alpha must be in (0, 1) or None, got {self.smooth_alpha}")


@dataclass(frozen=True)
class Int8BlockwiseConfig:
    """8-bit block-wise weights in ONNX Runtime's ``MatMulNBits`` (symmetric round to nearest,
    ``block_size`` rows of K per scale); with ``accuracy_level=4`` ONNX Runtime quantizes the
    activations to int8 per block of K in each row at run time. So a text's embedding does not
    depend on its batch-mates, which ``int8-dynamic``'s with ``activation_scale="tensor"`` does
    (SmolLM2, STS-B test: 58.28 at batch 32 and alone, against 57.82 / 58.45), at a lower
    batch-32 speed than either int8-dynamic form (``benchmarks/README.md``). No calibration
    data, no SmoothQuant.
    """

    block_size: int = 128
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations, 0 = as input type
    exclude: tuple[str, ...] = ()

    recipe = "int8-blockwise"

    def __post_init__(self) -> None:
        _check_matmulnbits(self.block_size, self.accuracy_level)


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """4-bit block-wise weight-only quantization to MatMulNBits (activations stay float).

    ``algorithm``: ``rtn`` (round to nearest), ``hqq`` (half-quadratic, no data) or ``gptq``
    (second-order, uses the calibration texts; ``float_zero`` stores fractional zero points, as
    HQQ does, which reproduce a Q4_1 checkpoint's grid exactly). ``quantize_embedding``: the
    token embedding table becomes a 4-bit GatherBlockQuantized too (RTN, blocks along hidden).
    ``accuracy_level`` is written on every MatMulNBits node, whichever the algorithm.
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
        _check_matmulnbits(self.block_size, self.accuracy_level)
        if self.symmetric and self.float_zero and self.algorithm == "gptq":
            raise UserError("float_zero needs asymmetric quantization (symmetric=False)")
        if not 0.0 < self.gptq_damp < 1.0:
            raise UserError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")


@dataclass(frozen=True)
class Int4QdqConfig:
    """4-bit weights as standard ONNX Q/DQ that TensorRT imports: a signed INT4 initializer ->
    ``DequantizeLinear`` (opset 21, ``axis=0``, ``block_size`` rows along K, no zero point,
    positive scales) -> ``MatMul``; no ``com.microsoft`` ops. Activations stay float.

    ``algorithm``: ``rtn`` (round to nearest) or ``gptq`` (echoembed's GPTQ on the same grid,
    uses the calibration texts). ``block_size`` must divide every quantized layer's K. The token
    embedding table stays float.
    """

    algorithm: Literal["rtn", "gptq"] = "rtn"
    block_size: int = 32
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    exclude: tuple[str, ...] = ()

    recipe = "int4-qdq"

    def __post_init__(self) -> None:
        if self.algorithm not in ("rtn", "gptq"):
            raise UserError(f"algorithm must be 'rtn' or 'gptq', got {self.algorithm!r}")
        _check_block_size(self.block_size)
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


RecipeConfig = (
    Int8DynamicConfig
    | Int8StaticConfig
    | Int8BlockwiseConfig
    | Int4WeightOnlyConfig
    | Int4QdqConfig
    | Fp16Config
)
RECIPE_TYPES = (
    Int8DynamicConfig, Int8StaticConfig, Int8BlockwiseConfig, Int4WeightOnlyConfig,
    Int4QdqConfig, Fp16Config,
)  # fmt: skip


# settings added after manifests with the recipe were written, whose default is not what those
# manifests' graphs do: a manifest without the key gets this value, not the field's default
_BEFORE_THE_SETTING: dict[str, dict[str, Any]] = {
    "int8-dynamic": {"activation_scale": "tensor", "fold_row_scales": False}
}


def settings_of(config: RecipeConfig) -> dict[str, Any]:
    """The config as JSON-ready settings for the manifest."""
    return {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()
    }


def recipe_from_settings(recipe: str, settings: dict[str, Any]) -> RecipeConfig:
    """The frozen config a manifest's ``quantization.settings`` were written from.

    Settings a config lacks (a newer echoembed) are an ``ArtifactError``; settings missing from an
    older manifest take the field's default, or what that older echoembed did where the default
    changed since (``_BEFORE_THE_SETTING``). Lists become tuples again.
    """
    cls = next((t for t in RECIPE_TYPES if _recipe_names(t) and recipe in _recipe_names(t)), None)
    if cls is None:
        raise ArtifactError(
            f"manifest: unknown quantization recipe {recipe!r}; known: "
            f"{sorted(n for t in RECIPE_TYPES for n in _recipe_names(t))}"
        )
    if not isinstance(settings, dict):
        raise ArtifactError(f"manifest: quantization settings of {recipe} are not a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ArtifactError(
            f"manifest: {recipe} settings {unknown} are unknown to this echoembed; upgrade "
            "echoembed (pip install -U echoembed)"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    for key, value in _BEFORE_THE_SETTING.get(recipe, {}).items():
        values.setdefault(key, value)
    if cls is Int4WeightOnlyConfig:
        values.setdefault("algorithm", recipe.removeprefix("int4-"))
    try:
        config = cls(**values)
    except (TypeError, UserError) as e:
        raise ArtifactError(f"manifest: {recipe} settings are invalid ({e})") from e
    if config.recipe != recipe:
        raise ArtifactError(
            f"manifest: recipe {recipe!r} disagrees with its settings ({config.recipe})"
        )
    return config


def _recipe_names(cls: type) -> tuple[str, ...]:
    if cls is Int4WeightOnlyConfig:
        return ("int4-rtn", "int4-hqq", "int4-gptq")
    return (cls.recipe,)
