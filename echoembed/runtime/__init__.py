"""The torch-free runtime: load an artifact and embed (numpy, tokenizers, onnxruntime only)."""

from __future__ import annotations

from echoembed.artifact import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Artifact,
    Manifest,
    ParityReport,
    SourceInfo,
    TemplateSpec,
    TensorSpec,
    read_manifest,
    verify_files,
)
from echoembed.runtime.embedder import Embedder
from echoembed.runtime.ort import OrtRunner, select_providers

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Artifact",
    "Embedder",
    "Manifest",
    "OrtRunner",
    "ParityReport",
    "SourceInfo",
    "TemplateSpec",
    "TensorSpec",
    "read_manifest",
    "select_providers",
    "verify_files",
]
