"""Deployment: Triton model repositories (``triton``) and a local ``tritonserver`` (``serve``).

Imports the runtime, echo and artifact packages only (never torch or transformers).
"""

from __future__ import annotations

from echoembed.deploy.serve import ServeConfig, TritonServer, find_tritonserver, serve
from echoembed.deploy.tokenize import TokenizeResult, artifact_encoder, tokenize_file, write_tokens
from echoembed.deploy.triton import (
    ENCODER_MODEL,
    ENSEMBLE_MODEL,
    MODEL_NAMES,
    TOKENIZER_MODEL,
    TritonRepoConfig,
    write_triton_repo,
)

__all__ = [
    "ENCODER_MODEL",
    "ENSEMBLE_MODEL",
    "MODEL_NAMES",
    "TOKENIZER_MODEL",
    "ServeConfig",
    "TokenizeResult",
    "TritonRepoConfig",
    "TritonServer",
    "artifact_encoder",
    "find_tritonserver",
    "serve",
    "tokenize_file",
    "write_tokens",
    "write_triton_repo",
]
