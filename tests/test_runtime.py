"""The torch-free runtime: parity with the reference on the real model, threads, bad artifacts."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from echoembed.echo import SpecialTokens
from echoembed.errors import ArtifactError, BackendError, InputError
from echoembed.runtime import Embedder, Manifest, read_manifest
from echoembed.validation import read_sts
from tests.helpers import BLOCK_HEAVY, STSB_DEV


@pytest.fixture(scope="module")
def dev_sentences():
    return read_sts(STSB_DEV, limit=48).unique_sentences()[:64]


@pytest.fixture(scope="module")
def runtime(smollm2_artifact):
    return Embedder.load(smollm2_artifact.path)


def test_real_model_parity_with_reference(smollm2_reference, runtime, dev_sentences):
    want = smollm2_reference.encode(dev_sentences, "echo", batch_size=32)
    for bs in (1, 7, 32):
        got = runtime.encode(dev_sentences, batch_size=bs)
        cos = (got * want).sum(axis=1)
        assert cos.min() >= 0.99999, f"batch {bs}: min cosine {cos.min()}"
    m = runtime.manifest
    assert m.parity.passed and m.parity.max_abs_diff <= 1e-4
    assert m.architecture == "llama" and m.hidden_size == 576 and m.source.name == "smollm2"
    assert m.special_tokens == SpecialTokens("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_other_templates_use_the_same_graph(smollm2_reference, runtime):
    texts = ["what lowers blood pressure?", "The drug lowered blood pressure."]
    for tpl in ("classical", "query", "document"):
        want = smollm2_reference.encode(texts, tpl)
        np.testing.assert_allclose(runtime.encode(texts, tpl), want, atol=1e-4)


def test_runtime_without_torch_or_transformers(smollm2_artifact, runtime, tmp_path):
    texts = ["A man is playing the guitar.", "Kids play.", "Stocks fell sharply."]
    np.save(tmp_path / "want.npy", runtime.encode(texts))
    code = BLOCK_HEAVY + textwrap.dedent(
        f"""
        import numpy as np
        from echoembed.runtime import Embedder
        e = Embedder.load({str(smollm2_artifact.path)!r})
        got = e.encode({texts!r})
        want = np.load({str(tmp_path / "want.npy")!r})
        assert np.abs(got - want).max() < 1e-6, np.abs(got - want).max()
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok"


def test_threads_give_the_same_result(runtime, dev_sentences):
    chunks = [dev_sentences[i::8] for i in range(8)]
    single = [runtime.encode(c, batch_size=4) for c in chunks]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda c: runtime.encode(c, batch_size=4), chunks))
    for a, b in zip(single, parallel, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def copy_artifact(tiny_artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_artifact.path, dst)
    return dst


def test_one_changed_byte_is_a_checksum_error(tiny_artifact, tmp_path):
    dst = copy_artifact(tiny_artifact, tmp_path)
    data = bytearray((dst / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (dst / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for model.onnx"):
        Embedder.load(dst)


def test_truncated_onnx_is_a_clear_error(tiny_artifact, tmp_path):
    dst = copy_artifact(tiny_artifact, tmp_path)
    data = (dst / "model.onnx").read_bytes()
    (dst / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match="checksum mismatch for model.onnx"):
        Embedder.load(dst)
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        Embedder.load(dst, verify=False)


def test_missing_tokenizer_is_a_clear_error(tiny_artifact, tmp_path):
    dst = copy_artifact(tiny_artifact, tmp_path)
    (dst / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json.*missing"):
        Embedder.load(dst)
    with pytest.raises(ArtifactError, match="tokenizer.json is missing"):
        Embedder.load(dst, verify=False)


def test_newer_format_and_broken_manifest(tiny_artifact, tmp_path):
    dst = copy_artifact(tiny_artifact, tmp_path)
    data = json.loads((dst / "manifest.json").read_text())
    data["format_version"] = 99
    (dst / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format version 99 is newer.*upgrade echoembed"):
        Embedder.load(dst)
    (dst / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(dst)
    (dst / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Embedder.load(dst)


def test_manifest_round_trip(tiny_artifact):
    m = read_manifest(tiny_artifact.path)
    assert m == tiny_artifact.manifest
    assert Manifest.from_dict(json.loads(m.to_json())) == m


def test_unavailable_provider_is_refused_unless_fallback_is_allowed(tiny_artifact, caplog):
    with pytest.raises(BackendError, match=r"NoSuchExecutionProvider.*allow_fallback=True"):
        Embedder.load(tiny_artifact.path, providers=["NoSuchExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="echoembed.runtime.ort"):
        e = Embedder.load(
            tiny_artifact.path, providers=["NoSuchExecutionProvider"], allow_fallback=True
        )
    assert "NoSuchExecutionProvider" in caplog.text and "falling back" in caplog.text
    assert e.runner.providers == ["CPUExecutionProvider"]
    assert e.encode(["hello"]).shape == (1, 32)


def test_unencodable_text_is_an_input_error(tiny_artifact):
    e = Embedder.load(tiny_artifact.path)
    texts = ["fine", "also fine", "still fine", "bad \ud800"]
    with pytest.raises(InputError, match=r"texts\[3\] cannot be encoded as UTF-8"):
        e.encode(texts)
    nul = e.encode(["a\x00b", "plain"])  # NUL is text: embedded, not rejected
    assert nul.shape == (2, 32) and np.isfinite(nul).all()


def test_bad_batch_is_a_backend_error(tiny_artifact):
    from echoembed.echo import EncodedBatch

    e = Embedder.load(tiny_artifact.path)
    ids = np.full((1, 4), 10**9, dtype=np.int64)  # out of vocabulary
    batch = EncodedBatch(ids, np.ones_like(ids), np.ones_like(ids), np.zeros(1, dtype=bool))
    with pytest.raises(BackendError, match="onnxruntime failed on a batch of shape"):
        e.runner.encode(batch)
