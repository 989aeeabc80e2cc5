"""`echoembed tokenize`: the artifact's model inputs, equal to what the runtime encodes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from echoembed.cli.main import main
from echoembed.deploy.tokenize import artifact_encoder
from echoembed.errors import ArtifactError
from echoembed.runtime import Embedder
from echoembed.validation import read_sts
from tests.helpers import STSB_TEST, run_blocked


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    texts = read_sts(STSB_TEST, limit=20).unique_sentences()[:30]
    texts.append(" ".join(["A very long sentence about nothing in particular."] * 40))
    path = tmp_path_factory.mktemp("tokenize") / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path, texts


@pytest.fixture(scope="module")
def runtime(smollm2_artifact):
    return Embedder.load(smollm2_artifact.path)


@pytest.mark.parametrize("template", [None, "query", "classical"])
def test_npz_is_the_encoders_batch(smollm2_artifact, runtime, texts_file, tmp_path, template):
    path, texts = texts_file
    out = tmp_path / "ids.npz"
    argv = ["tokenize", str(smollm2_artifact.path), "-i", str(path), "-o", str(out)]
    assert main(argv + ([] if template is None else ["--template", template])) == 0
    want = runtime.encoder(template).encode(texts)
    with np.load(out) as got:
        assert sorted(got.files) == ["attention_mask", "input_ids", "pool_mask", "truncated"]
        for name, array in want.feed().items():
            assert got[name].dtype == np.int64
            np.testing.assert_array_equal(got[name], array)
        np.testing.assert_array_equal(got["truncated"], want.truncated)
    assert not list(tmp_path.glob(".*")), "no temporary file left"


def test_json_is_the_encoders_rows(smollm2_artifact, runtime, texts_file, tmp_path, capsys):
    path, texts = texts_file
    out = tmp_path / "ids.json"
    argv = ["tokenize", str(smollm2_artifact.path), "-i", str(path), "-o", str(out)]
    assert main(argv + ["--template", "document", "--max-length", "8"]) == 0
    assert "wrote 31 prompts (document template" in capsys.readouterr().out
    doc = json.loads(out.read_text(encoding="utf-8"))
    want = runtime.encoder("document", max_length=8).encode_ids(texts)
    assert doc["template"] == "document" and doc["pad_id"] == runtime.encoder().pad_id
    assert doc["inputs"] == ["input_ids", "attention_mask", "pool_mask"]
    assert doc["prefix_ids"] == []  # the graph takes whole prompts
    assert [(r["ids"], r["pool"], r["truncated"]) for r in doc["rows"]] == [tuple(r) for r in want]
    assert max(len(r["ids"]) for r in doc["rows"]) < 40  # max_length 8 per piece took effect


def test_bad_requests_are_clear_errors(smollm2_artifact, texts_file, tmp_path, capsys):
    path, _ = texts_file
    art = str(smollm2_artifact.path)
    assert main(["tokenize", art, "-i", str(path), "-o", str(tmp_path / "x.csv")]) == 2
    assert "must end in .npz or .json" in capsys.readouterr().err
    blank = tmp_path / "blank.txt"
    blank.write_text("one\n\nthree\n", encoding="utf-8")
    assert main(["tokenize", art, "-i", str(blank), "-o", str(tmp_path / "x.npz")]) == 2
    assert "blank.txt:2 is blank" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
    bad = tmp_path / "art"
    bad.mkdir()
    for name in ("manifest.json", "tokenizer.json"):
        (bad / name).write_bytes((smollm2_artifact.path / name).read_bytes())
    with (bad / "tokenizer.json").open("a", encoding="utf-8") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        artifact_encoder(bad)


def test_tokenize_needs_no_torch(smollm2_artifact, texts_file, tmp_path):
    path, texts = texts_file
    out = tmp_path / "ids.npz"
    argv = ["tokenize", str(smollm2_artifact.path), "-i", str(path), "-o", str(out)]
    r = run_blocked(f"from echoembed.cli.main import main\nraise SystemExit(main({argv!r}))")
    assert r.returncode == 0, r.stderr
    with np.load(out) as got:
        assert got["input_ids"].shape[0] == len(texts)


# -- a prefix-reuse artifact (manifest format 5): the output is what its graph takes ----------


@pytest.fixture(scope="module")
def prefix_artifact(tiny_prefix_artifact):
    art = tiny_prefix_artifact
    assert len(art.manifest.prefix_ids) == 7
    return art


def test_prefix_artifact_npz_is_the_graphs_feed(prefix_artifact, texts_file, tmp_path):
    import onnxruntime as ort

    from echoembed.echo import strip_prefix

    path, texts = texts_file
    out = tmp_path / "ids.npz"
    assert main(["tokenize", str(prefix_artifact.path), "-i", str(path), "-o", str(out)]) == 0
    embedder = Embedder.load(prefix_artifact.path, threads=2)
    prefix = prefix_artifact.manifest.prefix_ids
    whole = embedder.encoder().encode(texts)
    want = strip_prefix(whole, prefix)
    with np.load(out) as got:
        assert sorted(got.files) == [
            "attention_mask", "input_ids", "pool_mask", "prefix_ids", "truncated"
        ]  # fmt: skip
        assert got["prefix_ids"].tolist() == list(prefix)
        assert got["input_ids"].shape == (len(texts), whole.input_ids.shape[1] - len(prefix))
        for name, array in want.feed().items():
            np.testing.assert_array_equal(got[name], array)
        np.testing.assert_array_equal(got["truncated"], whole.truncated)
        feed = {name: got[name] for name in ("input_ids", "attention_mask", "pool_mask")}
    # fed to the graph as is, they give the runtime's embeddings
    model = str(prefix_artifact.model_path)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (emb,) = session.run(["embedding"], feed)
    np.testing.assert_allclose(emb, embedder.encode(texts), atol=1e-5)


def test_prefix_artifact_json_rows_and_wrong_template(prefix_artifact, texts_file, tmp_path,
                                                      capsys):  # fmt: skip
    path, texts = texts_file
    art = str(prefix_artifact.path)
    out = tmp_path / "ids.json"
    assert main(["tokenize", art, "-i", str(path), "-o", str(out)]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    prefix = list(prefix_artifact.manifest.prefix_ids)
    assert doc["prefix_ids"] == prefix
    whole = Embedder.load(prefix_artifact.path, session=False).encoder().encode_ids(texts)
    assert [(prefix + r["ids"], [0] * len(prefix) + r["pool"], r["truncated"])
            for r in doc["rows"]] == [tuple(r) for r in whole]  # fmt: skip
    assert f"without the {len(prefix)} baked prefix tokens" in capsys.readouterr().out
    assert main(["tokenize", art, "-i", str(path), "-o", str(tmp_path / "q.json"),
                 "--template", "query"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "template 'query' starts with" in err and "prefix of template 'echo' baked in" in err
    assert not (tmp_path / "q.json").exists()
