"""echoembed: echo embeddings from causal LMs, exported to ONNX/TensorRT artifacts."""

from __future__ import annotations

__version__ = "0.3.0"
