"""The artifact contract and its one writer (stdlib + numpy; never torch or onnx).

- ``manifest``: the frozen ``Manifest`` dataclasses, read/verify, checksums, ``describe``;
- ``recipes``: the quantization recipes' typed settings, as a manifest records them;
- ``writer``: ``staged_dir`` (build beside the target, verify, rename into place) and the atomic
  file writers (``atomic_write``, ``atomic_write_json``, ``atomic_save_npy``).
"""

from __future__ import annotations

from echoembed.artifact.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    TOKENIZER_NAME,
    Artifact,
    FusionInfo,
    Manifest,
    ParityReport,
    PrefixInfo,
    QuantizationInfo,
    SourceInfo,
    TemplateSpec,
    TensorSpec,
    describe,
    graph_opset_imports,
    hash_files,
    read_manifest,
    sha256_file,
    verify_files,
)
from echoembed.artifact.recipes import RecipeConfig, recipe_from_settings, settings_of
from echoembed.artifact.writer import (
    StagedDir,
    atomic_save_npy,
    atomic_write,
    atomic_write_json,
    check_target,
    staged_dir,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODEL_FILE",
    "OUTPUT_NAME",
    "TOKENIZER_NAME",
    "Artifact",
    "Manifest",
    "ParityReport",
    "PrefixInfo",
    "FusionInfo",
    "QuantizationInfo",
    "RecipeConfig",
    "SourceInfo",
    "StagedDir",
    "TemplateSpec",
    "TensorSpec",
    "atomic_save_npy",
    "atomic_write",
    "atomic_write_json",
    "check_target",
    "describe",
    "graph_opset_imports",
    "hash_files",
    "read_manifest",
    "recipe_from_settings",
    "settings_of",
    "sha256_file",
    "staged_dir",
    "verify_files",
]
