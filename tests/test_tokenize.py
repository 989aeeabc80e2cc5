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
