"""Shared fixtures: expensive models load once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STSB_DEV = SHARED_DATA / "stsb" / "dev.tsv"
STSB_TEST = SHARED_DATA / "stsb" / "test.tsv"


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


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama saved as a Hugging Face directory, with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_llama_config())
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    smollm2_tokenizer[2].save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory, smollm2_reference):
    """The bundled model exported once per session (default config: echo, mean, dynamo)."""
    from echoembed.exporter import export

    return export(smollm2_reference.loaded, tmp_path_factory.mktemp("smollm2") / "artifact")


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_llama_dir):
    """A tiny Llama artifact for tests that damage files (cheap to copy)."""
    from echoembed.exporter import ExportConfig, export

    cfg = ExportConfig(exporter="torchscript")
    return export(tiny_llama_dir, tmp_path_factory.mktemp("tiny-art") / "artifact", cfg)
