"""Shared fixtures: expensive models load once per session (shared constants and helpers are in
``tests/helpers.py``; nothing here is meant to be imported)."""

from __future__ import annotations

import os

import pytest

# Nothing here may reach a model hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """(tokenizers.Tokenizer, SpecialTokens, transformers tokenizer) of the bundled SmolLM2."""
    from echoembed.reference.sources import load_tokenizer, resolve_source

    hf_tok, tok, special = load_tokenizer(resolve_source("smollm2"))
    return tok, special, hf_tok


@pytest.fixture(scope="session")
def smollm2_reference():
    """The real bundled model, loaded once."""
    from echoembed.reference import ReferenceEmbedder

    return ReferenceEmbedder.load("smollm2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama saved as a Hugging Face directory, with the SmolLM2 tokenizer."""
    from tests.tiny_models import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer[2])


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory, smollm2_reference):
    """The bundled model exported once per session (default config: echo, mean, dynamo, fused)."""
    from echoembed.exporter import export

    return export(smollm2_reference.loaded, tmp_path_factory.mktemp("smollm2") / "artifact")


@pytest.fixture(scope="session")
def smollm2_unfused_artifact(tmp_path_factory, smollm2_reference):
    """The bundled model exported without the fused stage (the graph TensorRT imports)."""
    from echoembed.exporter import ExportConfig, export

    out = tmp_path_factory.mktemp("smollm2-unfused") / "artifact"
    return export(smollm2_reference.loaded, out, ExportConfig(fuse=False))


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_llama_dir):
    """A tiny Llama artifact (default export) for quantization and tests that damage files."""
    from echoembed.exporter import export

    return export(tiny_llama_dir, tmp_path_factory.mktemp("tiny-art") / "artifact")


@pytest.fixture(scope="session")
def tiny_prefix_artifact(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama exported with shared-prefix reuse (echo, 7 baked ids; the traced route:
    head size 8 is not fused), for the consumers' tests (C++, tokenize, Triton)."""
    from echoembed.exporter import ExportConfig, export

    out = tmp_path_factory.mktemp("tiny-prefix") / "artifact"
    return export(tiny_llama_dir, out, ExportConfig(prefix_reuse=True))


@pytest.fixture(scope="session")
def tiny_dirs_gpt2_artifact(tmp_path_factory, smollm2_tokenizer):
    """A tiny GPT-2 artifact (Gemm layers, no gated MLP)."""
    from echoembed.exporter import ExportConfig, export
    from tests.tiny_models import save_tiny_model

    src = save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), smollm2_tokenizer[2])
    return export(src, tmp_path_factory.mktemp("gpt2-art") / "artifact", ExportConfig())
