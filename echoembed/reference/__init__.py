"""Full-precision PyTorch reference and model sources (imports torch lazily)."""

from __future__ import annotations

from echoembed.reference.bnb import BnbConfig, BnbConfigError, BnbEmbedder, quantize_bnb
from echoembed.reference.embedder import ReferenceEmbedder, TorchRunner
from echoembed.reference.sources import (
    BUNDLED,
    DEFAULT_MODEL,
    LoadedModel,
    ModelSource,
    load_model,
    resolve_source,
    save_hf_dir,
)

__all__ = [
    "BUNDLED",
    "DEFAULT_MODEL",
    "BnbConfig",
    "BnbConfigError",
    "BnbEmbedder",
    "LoadedModel",
    "ModelSource",
    "ReferenceEmbedder",
    "TorchRunner",
    "load_model",
    "quantize_bnb",
    "resolve_source",
    "save_hf_dir",
]
