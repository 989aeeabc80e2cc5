"""Exporter: causal LM + echo pooling head -> ONNX artifact (torch, onnx)."""

from __future__ import annotations

from echoembed.exporter.architectures import ARCHITECTURES, ArchitectureSpec, get_architecture
from echoembed.exporter.export import Artifact, ExportConfig, export, export_or_reuse
from echoembed.exporter.parity import DEFAULT_PARITY_TEXTS, ParityConfig

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_PARITY_TEXTS",
    "ArchitectureSpec",
    "Artifact",
    "ExportConfig",
    "ParityConfig",
    "export",
    "export_or_reuse",
    "get_architecture",
]
