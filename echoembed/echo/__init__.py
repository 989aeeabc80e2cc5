"""Echo core: templates, masks and pooling. numpy + tokenizers only (never torch)."""

from __future__ import annotations

from echoembed.echo.batching import Runner, embed_texts, padding_fraction, plan_batches
from echoembed.echo.encode import (
    INPUT_NAMES,
    EchoEncoder,
    EncodedBatch,
    EncodedRow,
    EncoderConfig,
    SpecialTokens,
    template_plans,
    validate_texts,
)
from echoembed.echo.plan import PlanPiece, PromptPlan, water_fill
from echoembed.echo.pooling import Pooling, l2_normalize, pool
from echoembed.echo.prefix import check_plan_prefix, leading_fixed_ids, strip_prefix
from echoembed.echo.presets import PRESETS, Preset, get_template
from echoembed.echo.template import Piece, Template, parse_pieces

__all__ = [
    "INPUT_NAMES",
    "PRESETS",
    "EchoEncoder",
    "EncodedBatch",
    "EncodedRow",
    "EncoderConfig",
    "Piece",
    "PlanPiece",
    "Pooling",
    "Preset",
    "PromptPlan",
    "Runner",
    "padding_fraction",
    "plan_batches",
    "SpecialTokens",
    "Template",
    "embed_texts",
    "get_template",
    "l2_normalize",
    "parse_pieces",
    "check_plan_prefix",
    "leading_fixed_ids",
    "strip_prefix",
    "pool",
    "template_plans",
    "validate_texts",
    "water_fill",
]
