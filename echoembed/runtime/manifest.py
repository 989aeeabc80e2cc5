"""Old location of the artifact contract, kept importable: it moved to ``echoembed.artifact`` in
0.3.0 (import from there). ``check_target``/``install_dir`` are gone: use
``echoembed.artifact.staged_dir``."""

from __future__ import annotations

from echoembed.artifact.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_FILE,
    TOKENIZER_NAME,
    Artifact,
    Manifest,
    ParityReport,
    QuantizationInfo,
    SourceInfo,
    TemplateSpec,
    TensorSpec,
    describe,
    hash_files,
    read_manifest,
    sha256_file,
    verify_files,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODEL_FILE",
    "TOKENIZER_NAME",
    "Artifact",
    "Manifest",
    "ParityReport",
    "QuantizationInfo",
    "SourceInfo",
    "TemplateSpec",
    "TensorSpec",
    "describe",
    "hash_files",
    "read_manifest",
    "sha256_file",
    "verify_files",
]
